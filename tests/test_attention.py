"""Local + global sparse attention (model.llm.attention=local_global): equal to dense attention when the window spans
the sequence, exactly as sparse as the pattern otherwise, never silently dropped, and generating through a cache that
keeps only what the pattern reads. Tiny random Llama and Qwen2 models."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_export_compat import old_export
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from vlm.config import ConfigError, LLMConfig, SparseAttentionConfig
from vlm.exports.vlm import load_vlm
from vlm.generation.kv_cache import LocalGlobalCache, cache_for
from vlm.models import attention as attention_module
from vlm.models.attention import (
    ATTENTION_NAME,
    MaskMissingError,
    SparsePattern,
    local_global_mask,
    packed_block_mask,
    packed_mask,
    register,
    use_attention,
)
from vlm.models.llm import enable_checkpointing

SIZES = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None}
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny_lm(family: str = "llama", layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    config_class, model_class = FAMILIES[family]
    return model_class(config_class(num_hidden_layers=layers, **SIZES)).eval()


def settings(attention: str = "local_global", window: int = 1024, stride: int = 64, sinks: int = 4) -> LLMConfig:
    return LLMConfig(name_or_path=None, tokenizer=None, config={}, gradient_checkpointing=False, max_length=64,
                     chat_template=None, attention=attention,
                     sparse=SparseAttentionConfig(window=window, stride=stride, sinks=sinks))


def loss_and_grads(lm: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    lm.zero_grad()
    out = lm(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_window_spanning_the_sequence_equals_dense_attention(family):
    ids = torch.randint(1, 64, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding in the second row
    lm = tiny_lm(family)
    dense_logits, dense_loss, dense_grads = loss_and_grads(lm, ids, mask)
    use_attention(lm, settings(window=24, stride=1000, sinks=0))
    assert lm.config._attn_implementation == ATTENTION_NAME
    logits, loss, grads = loss_and_grads(lm, ids, mask)
    real = mask.bool()
    assert torch.allclose(logits[real], dense_logits[real], atol=1e-5)
    assert torch.allclose(loss, dense_loss, atol=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(grad, dense_grads[name], atol=1e-5), name


def test_gradient_checkpointing_keeps_the_pattern():
    """Checkpointed decoder layers run again in backward, and through the sparse pattern: the loss and gradients are
    those computed without checkpointing."""
    ids = torch.randint(1, 64, (2, 24))
    mask = torch.ones_like(ids)
    lm = tiny_lm().train()
    use_attention(lm, settings(window=4, stride=8, sinks=1))
    attention_runs = []  # the layers' attention, inside what checkpointing recomputes (the layers' own hooks are not)
    for layer in lm.model.layers:
        layer.self_attn.register_forward_hook(lambda *_: attention_runs.append(1))
    _, loss, grads = loss_and_grads(lm, ids, mask)
    assert len(attention_runs) == len(lm.model.layers)  # each layer once, in the forward pass
    enable_checkpointing(lm)
    attention_runs.clear()
    _, recomputed_loss, recomputed = loss_and_grads(lm, ids, mask)
    assert len(attention_runs) == 2 * len(lm.model.layers)  # and again in backward, recomputing what was not kept
    assert torch.equal(recomputed_loss, loss)
    assert all(torch.allclose(recomputed[name], grad, atol=1e-6) for name, grad in grads.items())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_narrow_window_changes_the_logits(family):
    ids = torch.randint(1, 64, (1, 24))
    lm = tiny_lm(family)
    with torch.no_grad():
        dense = lm(ids).logits
        use_attention(lm, settings(window=4, stride=8, sinks=1))
        sparse = lm(ids).logits
    assert torch.allclose(sparse[:, :4], dense[:, :4], atol=1e-5)  # the first tokens see all their past either way
    assert (sparse[:, 8:] - dense[:, 8:]).abs().amax() > 1e-3


@pytest.mark.slow
def test_flex_attention_gives_the_sdpa_logits(monkeypatch):
    """kernel=flex where flex_attention runs (compiled; here on the CPU, forward only, made to run it): the cached
    BlockMask over gathered global keys, and the per-batch one for a left-padded batch, give the boolean-mask SDPA
    logits."""
    monkeypatch.setattr(attention_module, "flex_runs_on", lambda device: True)
    ids = torch.randint(1, 64, (2, 300))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    lm = tiny_lm()
    logits = {}
    with torch.no_grad():
        for kernel in ("sdpa", "flex"):
            config = settings(window=40, stride=16, sinks=3)
            config.sparse.kernel = kernel
            use_attention(lm, config)
            logits[kernel] = (lm(ids).logits, lm(ids, attention_mask=mask).logits)
    build = ALL_MASK_ATTENTION_FUNCTIONS[ATTENTION_NAME]  # the flex side really built BlockMasks
    assert isinstance(build(2, 300, 300, config=lm.config, device="cpu"), BlockMask)
    assert torch.allclose(logits["flex"][0], logits["sdpa"][0], atol=1e-5)
    real = mask.bool()
    assert torch.allclose(logits["flex"][1][real], logits["sdpa"][1][real], atol=1e-5)


def test_cpus_run_kernel_flex_through_the_boolean_mask():
    """On CPUs, kernel=flex gets SDPA's boolean masks, whole, padded and packed, so it trains and generates there."""
    config = settings(window=4, stride=8, sinks=1)
    config.sparse.kernel = "flex"
    lm = tiny_lm()
    use_attention(lm, config)
    build = ALL_MASK_ATTENTION_FUNCTIONS[ATTENTION_NAME]
    assert isinstance(build(2, 12, 12, config=lm.config, device="cpu"), torch.Tensor)
    assert isinstance(build(2, 12, 12, attention_mask=torch.ones(2, 12, dtype=torch.long), config=lm.config,
                            device="cpu"), torch.Tensor)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    assert isinstance(packed_mask(lm.config, torch.cat([torch.zeros(5), torch.ones(7)]).long()[None], positions),
                      torch.Tensor)
    _, loss, grads = loss_and_grads(lm.train(), torch.randint(1, 64, (2, 12)), torch.ones(2, 12, dtype=torch.long))
    assert loss.isfinite() and all(grad.isfinite().all() for grad in grads.values())


@pytest.mark.slow  # flex_attention run unfused on the CPU, over 300-token rows
def test_the_packed_block_mask_attends_as_the_boolean_mask():
    """Packed rows under kernel=flex on GPUs: the per-batch BlockMask lets flex_attention read exactly what the
    boolean mask lets SDPA read (flex run unfused here: the CPU has no compiled per-batch flex kernel)."""
    pattern = SparsePattern(window=40, stride=16, sinks=3)
    positions = torch.stack([torch.cat([torch.arange(170), torch.arange(130)]),
                             torch.cat([torch.arange(90), torch.arange(150), torch.arange(60)])])  # (2, 300)
    sample_ids = torch.stack([torch.cat([torch.zeros(170), torch.ones(130)]),
                              torch.cat([torch.zeros(90), torch.ones(150), torch.full((60,), 2)])]).long()
    query, key, value = torch.randn(3, 2, 4, 300, 8).unbind(0)  # (B, H, L, D) each
    block_mask = packed_block_mask(pattern, positions, sample_ids)
    boolean = local_global_mask(pattern, positions, sample_ids)  # (B, 1, L, L)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
        flex = flex_attention(query, key, value, block_mask=block_mask)
    sdpa = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=boolean)
    assert torch.allclose(flex, sdpa, atol=1e-5)
    assert block_mask.sparsity() > 100 / 3  # more than causality alone skips (3 of 9 blocks): those across samples


def test_gradients_are_exactly_as_sparse_as_the_pattern():
    """One layer, so token j reaches token i's output only through i's attention: d out_i / d x_j is non-zero exactly
    when j <= i and j is in i's window, global or a sink, over all pairs."""
    pattern = SparsePattern(window=3, stride=5, sinks=2)
    length = 14
    lm = tiny_lm(layers=1)
    use_attention(lm, settings(window=pattern.window, stride=pattern.stride, sinks=pattern.sinks))
    embeds = lm.get_input_embeddings()(torch.randint(1, 64, (1, length))).detach().requires_grad_(True)
    hidden = lm.model(inputs_embeds=embeds).last_hidden_state  # (1, L, D)
    for i in range(length):
        (grad,) = torch.autograd.grad(hidden[0, i].sum(), embeds, retain_graph=True)
        reached = grad[0].abs().sum(-1) > 0  # (L,)
        expected = torch.tensor([j <= i and (i - j < pattern.window or j % pattern.stride == 0 or j < pattern.sinks)
                                 for j in range(length)])
        assert torch.equal(reached, expected), (i, reached.int().tolist())


def test_an_unregistered_mask_function_fails_loudly():
    lm = tiny_lm()
    use_attention(lm, settings(window=4, stride=8, sinks=1))
    mask_function = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(ATTENTION_NAME)
    try:
        with pytest.raises(MaskMissingError, match="mask function is not registered"):
            lm(torch.randint(1, 64, (1, 12)))
    finally:
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[ATTENTION_NAME] = mask_function
    register()
    assert lm(torch.randint(1, 64, (1, 12))).logits.isfinite().all()


def test_a_left_padded_row_counts_the_pattern_from_its_first_token():
    lm = tiny_lm()
    use_attention(lm, settings(window=3, stride=4, sinks=1))
    ids = torch.randint(1, 64, (1, 14))
    padded, mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1), torch.ones(1, 17, dtype=torch.long)
    mask[:, :3] = 0
    with torch.no_grad():
        alone = lm(ids).logits
        shifted = lm(padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, 3:]
    assert torch.allclose(shifted, alone, atol=1e-5)


def test_a_packed_row_masks_each_sample_from_its_own_first_token():
    """Packed rows (data.packing) under the pattern: two samples in one row give each sample's own logits, through
    the packed-mask builder the attention registers and through the mask helper directly."""
    from vlm.models.packing import packed_lm_inputs

    pattern = SparsePattern(window=3, stride=4, sinks=1)
    lm = tiny_lm()
    use_attention(lm, settings(window=pattern.window, stride=pattern.stride, sinks=pattern.sinks))
    first, second = torch.randint(1, 64, (1, 9)), torch.randint(1, 64, (1, 7))
    positions = torch.cat([torch.arange(9), torch.arange(7)])[None]  # (1, 16)
    sample_ids = torch.cat([torch.zeros(9), torch.ones(7)]).long()[None]
    row = torch.cat([first, second], dim=1)
    with torch.no_grad():
        alone = torch.cat([lm(first).logits, lm(second).logits], dim=1)
        packed = lm(row, position_ids=positions,
                    attention_mask=local_global_mask(pattern, positions, sample_ids)).logits
        inputs = packed_lm_inputs(lm.config, lm.get_input_embeddings()(row), positions, None)
        through_packing = lm(**inputs).logits
    assert torch.allclose(packed, alone, atol=1e-5)
    assert torch.allclose(through_packing, alone, atol=1e-5)


def test_rows_packed_the_transformers_way_count_the_pattern_from_each_sample():
    """Packed rows as DataCollatorWithFlattening writes them (position ids restarting at 0, no attention mask):
    transformers keeps the samples apart, and the pattern must count from each sample's first token too."""
    lm = tiny_lm()
    use_attention(lm, settings(window=3, stride=4, sinks=1))
    samples = [torch.randint(1, 64, (1, n)) for n in (9, 7, 5)]
    row = torch.cat(samples, dim=1)
    positions = torch.cat([torch.arange(s.shape[1]) for s in samples])[None]  # (1, 21)
    with torch.no_grad():
        alone = torch.cat([lm(s).logits for s in samples], dim=1)
        packed = lm(row, position_ids=positions, use_cache=False).logits
    assert torch.allclose(packed, alone, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_pattern_cache_generates_the_full_cache_tokens_and_stays_bounded(family):
    pattern = SparsePattern(window=5, stride=4, sinks=2)
    lm = tiny_lm(family)
    use_attention(lm, settings(window=pattern.window, stride=pattern.stride, sinks=pattern.sinks))
    ids = torch.randint(1, 64, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the second row's pattern starts 3 tokens later
    ids[1, :3] = 0
    steps = {"max_new_tokens": 40, "min_new_tokens": 40, "do_sample": False}
    full = lm.generate(ids, attention_mask=mask, **steps)
    cache = cache_for(lm)
    assert isinstance(cache, LocalGlobalCache)
    assert torch.equal(lm.generate(ids, attention_mask=mask, cache=cache, **steps), full)
    assert cache.get_seq_length() == 49  # RoPE positions count every token, dropped ones too
    single = cache_for(lm)
    assert torch.equal(lm.generate(ids[:1], cache=single, **steps), full[:1])
    seen = single.get_seq_length()
    assert all(layer.cached_length() <= pattern.window + seen // pattern.stride + pattern.sinks + 1
               for layer in single.layers)
    assert single.layers[0].cached_length() < seen // 2
    beams = steps | {"max_new_tokens": 12, "min_new_tokens": 12, "num_beams": 3}  # the cache follows the beams' order
    assert torch.equal(lm.generate(ids, attention_mask=mask, cache=cache_for(lm), **beams),
                       lm.generate(ids, attention_mask=mask, **beams))


def test_a_model_that_updates_its_cache_without_kwargs_keeps_every_key_and_the_full_cache_tokens():
    """GPT-NeoX calls the cache's update without the attention kwargs, so the pattern cache cannot say which keys it
    returns: it keeps them all (no memory saved), and generation stays right instead of failing at its first step."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    lm = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=2, **SIZES)).eval()
    use_attention(lm, settings(window=5, stride=4, sinks=2))
    ids = torch.randint(1, 64, (1, 10))
    steps = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False}
    cache = cache_for(lm)
    assert torch.equal(lm.generate(ids, cache=cache, **steps), lm.generate(ids, **steps))
    assert [layer.cached_length() for layer in cache.layers] == [29, 29]


def test_a_pattern_cache_works_out_its_keep_set_once_per_step_for_all_layers(monkeypatch):
    """Every layer caches the same positions: one keep set (one device-to-host sync) per step, not one per layer."""
    lm = tiny_lm(layers=3)
    use_attention(lm, settings(window=5, stride=4, sinks=2))
    made = []
    needed_later = SparsePattern.needed_later
    monkeypatch.setattr(SparsePattern, "needed_later", lambda self, *args: made.append(args[2]) or needed_later(self,
                                                                                                               *args))
    ids = torch.randint(1, 64, (1, 10))
    full = lm.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert made == []  # the default cache
    cache = cache_for(lm)
    assert torch.equal(lm.generate(ids, cache=cache, max_new_tokens=12, min_new_tokens=12, do_sample=False), full)
    assert made == list(range(10, 22))  # the prompt, then each new token but the last: one keep set each
    assert len({id(layer.plan) for layer in cache.layers}) == 1


def test_dense_models_keep_the_default_cache():
    assert cache_for(tiny_lm()) is None


@pytest.mark.parametrize("key, value", [("window", 0), ("stride", 0), ("sinks", -1)])
def test_bad_pattern_values_name_the_key(key, value):
    from tiny import tiny_config
    with pytest.raises(ConfigError, match=f"model.llm.sparse.{key}"):
        tiny_config(f"model.llm.sparse.{key}={value}", "model.llm.attention=local_global")


def test_an_llm_outside_the_attention_interface_is_refused():
    class OwnAttention(LlamaForCausalLM):
        _supports_attention_backend = False

    with pytest.raises(ConfigError, match="model.llm.attention='local_global'.*OwnAttention"):
        use_attention(OwnAttention(LlamaConfig(num_hidden_layers=1, **SIZES)), settings())


@pytest.fixture(scope="module")
def local_global_export(tmp_path_factory: pytest.TempPathFactory):
    """A tiny sft export with a window narrower than an image's 16 tokens. Its LLM weights are drawn large enough that
    greedy answers depend on the whole prompt (at the usual init they repeat one token whatever they read)."""
    from tiny import tiny_config

    from vlm.exports.vlm import export_vlm
    from vlm.models.factory import new_vlm

    config = tiny_config("model.llm.attention=local_global", "model.llm.sparse.window=8", "model.llm.sparse.stride=4",
                         stage="sft")
    torch.manual_seed(0)
    vlm = new_vlm(config.model, config.tiler)
    for weight in vlm.model.lm.parameters():
        if weight.dim() > 1:
            torch.nn.init.normal_(weight, std=0.15)
    return export_vlm(tmp_path_factory.mktemp("local_global") / "export", vlm, "sft", config.tiler)


def test_a_streamed_request_for_a_cache_the_model_cannot_use_gets_a_400_before_the_stream(local_global_export):
    import httpx
    from live_server import LiveServer

    from vlm.chat import ChatModel
    from vlm.serve import ServeSettings, create_app

    server = LiveServer(create_app(ChatModel.load(local_global_export, device="cpu"), ServeSettings()))
    try:
        for path in ("/v1/messages", "/v1/chat/completions"):
            reply = httpx.post(f"{server.url}{path}", timeout=30, json={
                "model": "tiny", "max_tokens": 4, "kv_cache": "h2o", "stream": True,
                "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 400 and "h2o" in reply.text, (path, reply.status_code, reply.text[:300])
    finally:
        server.stop()


def test_an_export_records_its_attention_and_an_older_export_loads_dense(local_global_export, tmp_path):
    loaded = load_vlm(local_global_export)
    assert loaded.model.config.llm.attention == "local_global"
    assert loaded.model.lm.config._attn_implementation == ATTENTION_NAME
    assert cache_for(loaded.model.lm).layers[0].pattern == SparsePattern(window=8, stride=4, sinks=4)
    older = load_vlm(old_export("sft", tmp_path / "old"))
    assert older.model.config.llm.attention == "dense"
    assert older.model.lm.config._attn_implementation != ATTENTION_NAME
    assert cache_for(older.model.lm) is None


def test_the_chat_model_answers_through_the_pattern_cache_as_with_a_full_cache(local_global_export, monkeypatch):
    from images import solid

    from vlm.chat import ChatModel

    made: list[LocalGlobalCache] = []  # the caches chat builds, watched as they are made
    build = LocalGlobalCache.__init__

    def watched(self: LocalGlobalCache, *args) -> None:
        build(self, *args)
        made.append(self)

    monkeypatch.setattr(LocalGlobalCache, "__init__", watched)
    chat = ChatModel.load(local_global_export, device="cpu")
    prompt = chat.prepare([{"role": "user", "content": "<image>\nWhat colour is the shape?"}], [solid()])
    answer = chat.generate(prompt, max_new_tokens=24, temperature=0)
    (cache,) = made
    seen = cache.get_seq_length()
    assert seen == prompt.input_tokens + len(answer.token_ids) - 1  # the last token is never fed back
    assert max(layer.cached_length() for layer in cache.layers) < seen // 2  # what the pattern no longer reads: gone
    inputs = chat._inputs([prompt])
    full = chat.model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=chat.tokenizer.pad_token_id,
                               eos_token_id=sorted(chat.eos_token_ids))[0].tolist()
    assert len(set(answer.token_ids)) > 1 and answer.token_ids == full[: len(answer.token_ids)]


def test_h2o_refuses_a_local_global_model_in_chat_and_when_built_directly(local_global_export):
    from images import solid

    from vlm.chat import ChatModel, OptionError
    from vlm.generation.h2o import H2OBudget, H2OCache

    chat = ChatModel.load(local_global_export, device="cpu")
    prompt = chat.prepare([{"role": "user", "content": "<image>\nWhat colour is the shape?"}], [solid()])
    with pytest.raises(OptionError, match="kv_cache='h2o' does not combine with .*local_global"):
        chat.generate(prompt, max_new_tokens=4, temperature=0, kv_cache="h2o")
    with pytest.raises(OptionError, match="kv_cache='h2o'"):  # the benchmarks build the cache themselves
        H2OCache(chat.model.lm, H2OBudget(heavy=2, recent=2, sinks=1))
    # a REPL session and a server with it as their default refuse it as they start, not at the first message
    with pytest.raises(OptionError, match="kv_cache='h2o' does not combine"):
        chat.session(kv_cache="h2o")
    from vlm.serve import ServeSettings, create_app

    with pytest.raises(OptionError, match="kv_cache='h2o' does not combine"):
        create_app(chat, ServeSettings(kv_cache="h2o"))
    assert chat.model.lm.config._attn_implementation == ATTENTION_NAME  # the pattern was left in place


def test_a_run_asking_for_local_global_gets_it_from_a_dense_export(tiny_sft_export):
    from tiny import make_task, tiny_config

    config = tiny_config("model.llm.attention=local_global", "model.llm.sparse.window=16", stage="sft", tiny=False)
    task = make_task(config, init_from=tiny_sft_export)
    assert task.model.lm.config._attn_implementation == ATTENTION_NAME
    assert task.model.config.llm.sparse.window == 16  # what its export will record
    assert cache_for(task.model.lm).layers[0].pattern.window == 16


def test_a_stage_from_a_local_global_high_resolution_export_says_it_trains_otherwise(tmp_path, caplog):
    """Each run takes its attention and tiler from its own config: an sft run from a local_global align export
    tiled at 4 tiles would go on dense at one tile without a word."""
    import logging

    from tiny import make_task, tiny_config

    from vlm.exports.vlm import export_vlm
    from vlm.models.factory import new_vlm

    config = tiny_config("model.llm.attention=local_global", "model.llm.sparse.window=8", "model.llm.sparse.stride=4",
                         "tiler.max_tiles=4", stage="align")
    torch.manual_seed(0)
    export = export_vlm(tmp_path / "export", new_vlm(config.model, config.tiler), "align", config.tiler)
    with caplog.at_level(logging.WARNING, logger="vlm.training.vlm_task"):
        make_task(tiny_config(stage="sft"), init_from=export)
    assert (f"{export} trained with model.llm.attention=local_global (model.llm.sparse.window=8 "
            f"model.llm.sparse.stride=4") in caplog.text
    assert "this run trains with model.llm.attention=dense (its own setting)" in caplog.text
    assert f"{export} trained with tiler.max_tiles=4; this run tiles at most 1 per image" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlm.training.vlm_task"):
        make_task(tiny_config("model.llm.attention=local_global", "model.llm.sparse.window=8",
                              "model.llm.sparse.stride=4", "tiler.max_tiles=4", stage="sft"), init_from=export)
    assert "trained with" not in caplog.text  # the export's own settings: nothing to say
