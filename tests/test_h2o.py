"""The H2O KV cache: identical answers when the budget holds everything, the budget held, positions after eviction,
the kept set on a hand-built attention pattern, the chunked score sums, batches and beams, and settings errors."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from vlm.config import ConfigError, load_config
from vlm.generation.h2o import (
    H2O_LAYER,
    H2OBudget,
    H2OCache,
    H2OLayer,
    PaddedBatchError,
    attention_column_scores,
    image_ends,
    score_block,
)
from vlm.generation.options import IMAGE_BLOCKS, GenerationOptions, H2OSettings, OptionError


@pytest.fixture(scope="module")
def lm() -> LlamaForCausalLM:
    """A tiny random Llama with grouped-query attention (4 query heads share 2 key-value heads)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.3, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def prompt(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(lm: LlamaForCausalLM, ids: torch.Tensor, new: int, **kwargs) -> torch.Tensor:
    return lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("beams", [1, 3])
def test_a_budget_holding_everything_answers_like_the_dynamic_cache(lm, beams):
    ids = prompt(30, batch=2 if beams == 1 else 1)
    reference = greedy(lm, ids, 20, num_beams=beams)
    cache = H2OCache(lm, H2OBudget(heavy=30, recent=20, sinks=4))
    assert torch.equal(greedy(lm, ids, 20, num_beams=beams, cache=cache), reference)
    assert cache.get_seq_length() == 30 + 19  # every token fed, the last one generated but never fed


class HeldKeys(LogitsProcessor):
    """Records, after every forward pass, how many keys each layer of `cache` holds."""

    def __init__(self, cache: H2OCache):
        self.cache, self.held = cache, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.held.append([layer.held() for layer in self.cache.layers])
        return scores


def spy_reads(cache: H2OCache) -> list[int]:
    """The keys each layer's attention read, pass by pass (the scores it reports cover every key it saw)."""
    reads: list[int] = []
    for layer in cache.layers:
        observe = layer.observe
        layer.observe = lambda scores, observe=observe: (reads.append(scores.shape[-1]), observe(scores))
    return reads


def test_the_cache_never_holds_more_than_the_budget(lm):
    budget = H2OBudget(heavy=3, recent=4, sinks=2)
    cache = H2OCache(lm, budget)
    read_per_step = spy_reads(cache)
    held = HeldKeys(cache)
    greedy(lm, prompt(30), 25, cache=cache, logits_processor=LogitsProcessorList([held]))
    assert len(held.held) == 25
    assert max(max(step) for step in held.held) == budget.total  # between steps
    assert read_per_step[:2] == [30, 30]  # the prefill reads the whole prompt, then evicts
    assert max(read_per_step[2:]) == budget.total + 1  # a decoding step: the budget and the new token


def read_then_generate(lm: LlamaForCausalLM, ids: torch.Tensor, new: int, cache: H2OCache, **kwargs) -> torch.Tensor:
    cache.read_prompt(lm, lm.get_input_embeddings()(ids))  # what VisionLanguageModel.generate does first
    return greedy(lm, ids, new, cache=cache, **kwargs)


@pytest.mark.parametrize("block", [1, 7])
def test_a_prompt_read_in_blocks_with_room_for_everything_answers_like_the_dynamic_cache(lm, block):
    ids = prompt(30, batch=2)
    cache = H2OCache(lm, H2OBudget(heavy=30, recent=20, sinks=4, prompt_block=block))
    assert torch.equal(read_then_generate(lm, ids, 20, cache), greedy(lm, ids, 20))
    assert cache.get_seq_length() == 30 + 19


@pytest.mark.parametrize("block", [7, IMAGE_BLOCKS])
def test_beam_search_after_a_prompt_read_in_blocks_answers_like_the_dynamic_cache(lm, block):
    """`generate` expands the rows for beams after the cache has read the prompt once per row."""
    ids = prompt(30, batch=2)
    beams = {"num_beams": 3, "num_return_sequences": 2}
    cache = H2OCache(lm, H2OBudget(heavy=30, recent=20, sinks=4, prompt_block=block))
    cache.read_prompt(lm, lm.get_input_embeddings()(ids), image_rows())
    assert torch.equal(greedy(lm, ids, 12, cache=cache, **beams), greedy(lm, ids, 12, **beams))
    assert all(layer.keys.shape[0] == 2 * 3 for layer in cache.layers)


def test_a_prompt_read_in_blocks_never_holds_more_than_the_budget_and_a_block(lm):
    budget = H2OBudget(heavy=3, recent=4, sinks=2, prompt_block=5)
    cache = H2OCache(lm, budget)
    read_per_step = spy_reads(cache)
    ids = prompt(30)
    answer = read_then_generate(lm, ids, 10, cache)
    prompt_reads = read_per_step[: 2 * 6]  # 29 tokens in blocks of 5: 6 passes, 2 layers each
    assert prompt_reads[:2] == [5, 5] and max(prompt_reads) == budget.total + 5
    assert read_per_step[12:14] == [budget.total + 1] * 2  # generate reads only the last prompt token
    assert max(read_per_step) == budget.total + 5 and max(layer.held() for layer in cache.layers) == budget.total
    assert not torch.equal(answer, greedy(lm, ids, 10, cache=H2OCache(lm, H2OBudget(heavy=3, recent=4, sinks=2))))


def image_rows() -> torch.Tensor:
    """Image tokens of a 2-row, 30-token batch: row 0 has an image ending at 11, row 1 one ending at 19."""
    images = torch.zeros(2, 30, dtype=torch.bool)
    images[0, 3:11] = True
    images[1, 12:19] = True
    return images


def test_image_blocks_end_a_pass_after_each_image_of_any_row(lm):
    images = image_rows()
    assert image_ends(images) == [11, 19]
    budget = H2OBudget(heavy=3, recent=4, sinks=2, prompt_block=IMAGE_BLOCKS)
    cache = H2OCache(lm, budget)
    reads = spy_reads(cache)
    ids = prompt(30, batch=2)
    cache.read_prompt(lm, lm.get_input_embeddings()(ids), images)
    assert reads == [11, 11, 9 + 8, 9 + 8]  # passes [0, 11) and [11, 19), each after the 9 kept keys (2 layers)
    greedy(lm, ids, 1, cache=cache)
    assert reads[4:] == [9 + 11, 9 + 11]  # generate reads the words after the last image, [19, 30), in one pass


def test_image_blocks_with_room_for_everything_answer_like_the_dynamic_cache(lm):
    ids = prompt(30, batch=2)
    cache = H2OCache(lm, H2OBudget(heavy=30, recent=20, sinks=4, prompt_block=IMAGE_BLOCKS))
    cache.read_prompt(lm, lm.get_input_embeddings()(ids), image_rows())
    assert cache.get_seq_length() == 19
    assert torch.equal(greedy(lm, ids, 20, cache=cache), greedy(lm, ids, 20))


def test_the_chat_model_reads_each_image_whole_with_image_blocks(tiny_chat_model):
    from images import solid

    chat = tiny_chat_model
    prompt_ = chat.prepare([{"role": "user", "content": "<image>\nWhat colour is the shape?"}], [solid()])
    inputs = chat._inputs([prompt_])
    image_end = int((inputs["input_ids"][0] == chat.model.image_token_id).nonzero().max()) + 1
    cache = H2OCache(chat.model.lm, H2OBudget(heavy=2, recent=3, sinks=1, prompt_block=IMAGE_BLOCKS))
    reads = spy_reads(cache)
    chat.model.generate(**inputs, cache=cache, max_new_tokens=1, do_sample=False,
                        pad_token_id=chat.tokenizer.pad_token_id)
    assert reads[0] == image_end < inputs["input_ids"].shape[1] - 1  # the first pass ends with the image
    assert reads[len(cache.layers)] == 6 + inputs["input_ids"].shape[1] - image_end  # then generate reads the words


@pytest.mark.parametrize("block", [1, 4])
def test_positions_after_eviction_match_a_reference_from_the_stored_keys(lm, block):
    """Feed a fixed token sequence through an evicting cache; the logits of the last step (one token, or a block of
    tokens) must equal the model run by hand on the stored keys at their original positions. The kept keys of the
    first layer, which depend only on token and position, must equal a full run's at the positions the cache kept."""
    tokens = prompt(40, seed=2)
    start = 40 - block
    cache = H2OCache(lm, H2OBudget(heavy=5, recent=6, sinks=2))
    with torch.no_grad():
        lm(input_ids=tokens[:, :24], cache=cache, use_cache=True)  # prefill 24, then one token at a time
        for step in range(24, start):
            lm(input_ids=tokens[:, step: step + 1], cache=cache, use_cache=True)
        stored = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        positions = cache.layers[0].positions.clone()  # (1, H_kv, 13)
        logits = lm(input_ids=tokens[:, start:], cache=cache, use_cache=True).logits[0]
        reference = lm(input_ids=tokens[:, start:], cache=DynamicCache(stored), use_cache=True,
                       position_ids=torch.arange(start, 40)[None]).logits[0]
        full = DynamicCache()
        lm(input_ids=tokens[:, :start], cache=full, use_cache=True)
    assert stored[0][0].shape[-2] == 13 and not torch.equal(positions[0, 0], positions[0, 1])  # heads differ
    torch.testing.assert_close(logits, reference)
    full_keys = full.layers[0].keys.gather(2, positions.unsqueeze(-1).expand(-1, -1, -1, stored[0][0].shape[-1]))
    torch.testing.assert_close(stored[0][0], full_keys)
    assert positions[0, 0, :2].tolist() == [0, 1] and positions[0, 0, -6:].tolist() == list(range(start - 6, start))


def hand_step(layer: H2OLayer, scores: list[list[float]]) -> None:
    """One step of `len(scores[0]) - held` new tokens, then these per-head attention totals for every key."""
    new = len(scores[0]) - layer.held()
    kwargs: dict = {}
    layer.update(torch.randn(1, 2, new, 4), torch.randn(1, 2, new, 4), kwargs=kwargs)
    assert kwargs[H2O_LAYER] is layer  # the attention function finds the layer here
    layer.observe(torch.tensor([scores]))


def test_the_kept_set_is_sinks_the_recent_window_and_the_top_accumulated_scores():
    layer = H2OLayer(H2OBudget(heavy=2, recent=2, sinks=1, ranking="sum"))
    # positions:  0    1    2    3    4    5    6    7
    hand_step(layer, [[9.0, 0.1, 3.0, 0.2, 0.1, 4.0, 0.3, 0.3],    # head 0: heavy 2 and 5
                      [9.0, 5.0, 0.1, 0.2, 6.0, 0.1, 0.0, 0.0]])   # head 1: heavy 1 and 4
    assert layer.positions[0].tolist() == [[0, 2, 5, 6, 7], [0, 1, 4, 6, 7]]
    # one new token (position 8); scores follow the kept order [0, 2, 5, 6, 7, 8]: head 0's position 6 gets 3.5 more
    # (3.8 in all) and overtakes position 2 (3.0); the recent window moves on to 7 and 8
    hand_step(layer, [[1.0, 0.0, 0.0, 3.5, 0.1, 0.1],
                      [1.0, 0.0, 0.0, 0.0, 0.0, 0.1]])
    assert layer.positions[0].tolist() == [[0, 5, 6, 7, 8], [0, 1, 4, 7, 8]]
    assert layer.scores[0, 0].tolist() == pytest.approx([10.0, 4.0, 3.8, 0.4, 0.1])
    assert layer.get_seq_length() == 9 and layer.held() == 5


@pytest.mark.parametrize("ranking,kept,after", [("sum", [0, 3], [0, 4]), ("mean", [2, 3], [3, 4])])
def test_heavy_hitters_rank_by_summed_or_mean_attention(ranking, kept, after):
    """Position 0 has received the most attention in all (2.0 against 1.5), but from four queries; position 2 from
    two. Summed, 0 stays; per query, 2 does."""
    layer = H2OLayer(H2OBudget(heavy=1, recent=1, sinks=0, ranking=ranking))
    layer.update(torch.randn(1, 1, 4, 3), torch.randn(1, 1, 4, 3), kwargs={})
    layer.observe(torch.tensor([[[2.0, 0.3, 1.5, 0.1]]]))
    assert layer.positions[0, 0].tolist() == kept
    # a decoding step (position 4): the candidates now have one more reader each. Summed, 0 (2.0) keeps its lead over
    # 3 (0.1 + 1.0). Per query, 3 (1.1 over 2 readers) overtakes 2 (1.5 + 0.0 over 3)
    layer.update(torch.randn(1, 1, 1, 3), torch.randn(1, 1, 1, 3), kwargs={})
    layer.observe(torch.tensor([[[0.0, 1.0, 0.2]]]))
    assert layer.positions[0, 0].tolist() == after


@pytest.mark.parametrize("ranking,after", [("max", [3, 4]), ("sum", [0, 4])])
def test_heavy_hitters_rank_by_the_largest_share_one_query_gave(ranking, after):
    """Position 0 drew 0.9 of one query's attention, then 0.2; position 3 drew 0.1, then 0.95. Summed, 0 leads
    (1.1 against 1.05); by the largest share, 3 does, so the key one query needed most is the one kept."""
    layer = H2OLayer(H2OBudget(heavy=1, recent=1, sinks=0, ranking=ranking))
    layer.update(torch.randn(1, 1, 4, 3), torch.randn(1, 1, 4, 3), kwargs={})
    layer.observe(torch.tensor([[[0.9, 0.3, 0.5, 0.1]]]))
    assert layer.positions[0, 0].tolist() == [0, 3]
    layer.update(torch.randn(1, 1, 1, 3), torch.randn(1, 1, 1, 3), kwargs={})
    layer.observe(torch.tensor([[[0.2, 0.95, 0.1]]]))
    assert layer.positions[0, 0].tolist() == after


@pytest.mark.parametrize("ranking,kept", [("contribution", [1, 3]), ("max", [0, 3])])
def test_contribution_weighs_each_keys_lift_by_its_values_norm(ranking, kept):
    """Position 0 drew the most (0.5 against 0.3), but its value is half as long as position 1's: what position 1 adds
    to a query's output is the larger term (0.3 x 2 against 0.5 x 1), so `contribution` keeps it and `max` keeps 0."""
    layer = H2OLayer(H2OBudget(heavy=1, recent=1, sinks=0, ranking=ranking))
    values = torch.tensor([1.0, 2.0, 1.0, 1.0]).view(1, 1, 4, 1) * torch.tensor([0.6, 0.8])  # norms 1, 2, 1, 1
    keys = torch.tensor([4.0, 1.0, 1.0, 1.0]).view(1, 1, 4, 1) * torch.tensor([0.8, 0.6])  # lengths 4, 1, 1, 1: unused
    layer.update(keys, values, kwargs={})
    layer.observe(torch.tensor([[[0.5, 0.3, 0.3, 0.1]]]))
    assert layer.positions[0, 0].tolist() == kept


def test_the_kept_keys_are_the_stored_rows_of_their_positions():
    layer = H2OLayer(H2OBudget(heavy=1, recent=1, sinks=1))
    keys = torch.randn(1, 1, 5, 3)
    layer.update(keys, keys + 1, kwargs={})
    layer.observe(torch.tensor([[[1.0, 0.0, 2.0, 0.5, 0.0]]]))
    assert torch.equal(layer.keys, keys[:, :, [0, 2, 4]]) and torch.equal(layer.values, keys[:, :, [0, 2, 4]] + 1)


def test_column_scores_in_blocks_equal_the_full_softmax():
    torch.manual_seed(0)
    query, key = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 9, 8)  # 7 new queries over 2 held + 7 new keys
    logits = torch.einsum("bhqd,bhkd->bhqk", query, key.repeat_interleave(2, dim=1)) * 0.3
    causal = torch.ones(7, 9, dtype=torch.bool).tril(diagonal=2)
    expected = logits.masked_fill(~causal, float("-inf")).softmax(-1).sum(2).view(2, 2, 2, 9).sum(2)
    torch.testing.assert_close(attention_column_scores(query, key, None, 0.3, block=3), expected)
    mask = causal.expand(2, 1, 7, 9)
    torch.testing.assert_close(attention_column_scores(query, key, mask, 0.3, block=2), expected)
    # the largest share of any query in the heads sharing a key-value head, in blocks, with or without the mask
    largest = logits.masked_fill(~causal, float("-inf")).softmax(-1).view(2, 2, 2, 7, 9).amax(dim=(2, 3))
    torch.testing.assert_close(attention_column_scores(query, key, None, 0.3, "max", block=3), largest)
    torch.testing.assert_close(attention_column_scores(query, key, mask, 0.3, "max", block=2), largest)
    # the largest lift: each share times the keys its query read (query i reads the 2 held keys and new keys 0..i)
    keys_read = causal.sum(-1, keepdim=True).float()  # (7, 1): 3, 4, ..., 9
    lifts = (logits.masked_fill(~causal, float("-inf")).softmax(-1) * keys_read).view(2, 2, 2, 7, 9).amax(dim=(2, 3))
    torch.testing.assert_close(attention_column_scores(query, key, None, 0.3, "lift", block=3), lifts)
    torch.testing.assert_close(attention_column_scores(query, key, mask, 0.3, "lift", block=2), lifts)
    additive = torch.zeros(2, 1, 7, 9).masked_fill(~mask, torch.finfo(torch.float32).min)
    torch.testing.assert_close(attention_column_scores(query, key, additive, 0.3, "lift", block=4), lifts)


def test_default_column_sum_blocks_fit_the_device_budget_with_the_same_result():
    torch.manual_seed(0)
    query, key = torch.randn(1, 8, 1024, 4), torch.randn(1, 8, 1024, 4)
    rows = score_block(8, 1024, torch.device("cpu"))
    assert 16 <= rows < 1024 and rows * 8 * 1024 <= 2**20  # several blocks, each's logits within 4 MiB
    # GPUs take bigger blocks, but a 128k-token prompt no longer gets 256 rows (4 GiB of scores at 32 heads)
    assert score_block(8, 1024, torch.device("cuda")) == 256
    assert score_block(32, 2**17, torch.device("cuda")) * 32 * 2**17 * 4 <= 2**30
    torch.testing.assert_close(attention_column_scores(query, key, None, 0.5),
                               attention_column_scores(query, key, None, 0.5, block=1024))


def test_beam_reordering_moves_scores_and_positions_with_their_keys():
    layer = H2OLayer(H2OBudget(heavy=1, recent=1, sinks=0, ranking="contribution"))
    lengths = torch.tensor([[1.0, 1.1, 1.2, 1.3], [2.0, 2.1, 2.2, 2.3]]).view(2, 1, 4, 1)  # each row's value lengths
    keys = torch.nn.functional.normalize(torch.randn(2, 1, 4, 3), dim=-1) * lengths
    layer.update(keys, keys, kwargs={})
    layer.observe(torch.tensor([[[0.0, 5.0, 1.0, 0.0]], [[0.0, 1.0, 5.0, 0.0]]]))  # row 0 keeps 1, row 1 keeps 2
    layer.reorder_cache(torch.tensor([1, 1]))  # both beams continue row 1
    assert layer.positions[:, 0].tolist() == [[2, 3], [2, 3]] and torch.equal(layer.keys[0], keys[1, :, [2, 3]])
    assert layer.scores[:, 0].tolist() == [[5.0, 0.0], [5.0, 0.0]]
    torch.testing.assert_close(layer.value_norms[:, 0], torch.tensor([[2.2, 2.3], [2.2, 2.3]]))  # values = keys


def test_a_window_without_heavy_hitters_keeps_sinks_and_the_newest_tokens(lm):
    cache = H2OCache(lm, H2OBudget(heavy=0, recent=5, sinks=3))
    greedy(lm, prompt(20), 6, cache=cache)
    assert cache.layers[1].positions[0, 0].tolist() == [0, 1, 2, 20, 21, 22, 23, 24]


def test_beam_search_evicts_and_reorders_with_its_scores(lm):
    cache = H2OCache(lm, H2OBudget(heavy=4, recent=4, sinks=2))
    out = greedy(lm, prompt(24), 12, num_beams=3, cache=cache)
    assert out.shape == (1, 36)
    assert cache.layers[0].scores.shape[:2] == (3, 2) and cache.layers[0].held() == 10


@pytest.mark.parametrize("heavy", [2, 0])
def test_a_padded_batch_is_refused(lm, heavy):
    ids = prompt(12, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with pytest.raises(PaddedBatchError, match="left-padded batch"):
        lm.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                    cache=H2OCache(lm, H2OBudget(heavy=heavy, recent=2, sinks=1)))


@pytest.mark.parametrize("block", [1, 4, IMAGE_BLOCKS])
def test_a_padded_batch_read_in_blocks_is_refused_before_the_first_pass(tiny_chat_model, block):
    """The passes that read the prompt before `generate` take no mask, so they would read a row's padding as words:
    a left-padded batch is refused before them, as `generate` refuses one read whole."""
    from images import solid

    chat = tiny_chat_model
    prompts = [chat.prepare([{"role": "user", "content": "<image>\n" + question}], [solid()])
               for question in ("What colour?", "What colour is the shape in the picture?")]
    inputs = chat._inputs(prompts)
    assert not bool(inputs["attention_mask"].all())  # left-padded
    cache = H2OCache(chat.model.lm, H2OBudget(heavy=2, recent=3, sinks=1, prompt_block=block))
    reads = spy_reads(cache)
    with pytest.raises(PaddedBatchError, match="left-padded batch"):
        chat.model.generate(**inputs, cache=cache, max_new_tokens=2, do_sample=False,
                            pad_token_id=chat.tokenizer.pad_token_id)
    assert reads == []


def test_image_blocks_end_after_each_of_two_images_written_side_by_side():
    """`<image><image>` is one run of image tokens; the slots tell the two images apart, so each ends a pass."""
    images = torch.zeros(1, 12, dtype=torch.bool)
    images[0, 2:8] = True  # two images of 3 tokens each, adjacent
    assert image_ends(images, torch.tensor([0, 0, 0, 1, 1, 1])) == [5, 8]
    assert image_ends(images) == [8]  # without slots, a run is an image


def test_fractions_resolve_against_the_prompt_length():
    assert H2OBudget.for_prompt(H2OSettings(heavy=0.1, recent=0.25, sinks=4), 100) == H2OBudget(10, 25, 4)
    assert H2OBudget.for_prompt(H2OSettings(heavy=7, recent=1.0, sinks=0), 30) == H2OBudget(7, 30, 0)
    # a share of a short prompt rounds up: 2.5 tokens keep 3, and a small window still holds the newest token
    assert H2OBudget.for_prompt(H2OSettings(heavy=0.1, recent=0.01, sinks=4), 25) == H2OBudget(3, 1, 4)


@pytest.mark.parametrize("options,key", [
    ({"kv_cache": "h20"}, "kv_cache='h20' is not valid; choose one of ['dynamic', 'h2o']. Did you mean 'h2o'?"),
    ({"h2o": {"heavy": -1}}, "h2o.heavy=-1"),
    ({"h2o": {"recent": 1.5}}, "h2o.recent=1.5"),
    ({"h2o": {"sinks": 0.5}}, "h2o.sinks=0.5"),
    ({"h2o": {"recent": 0}}, "h2o.recent=0"),
    ({"h2o": {"ranking": "top"}}, "h2o.ranking='top'"),
    ({"h2o": {"ranking": "means"}}, "h2o.ranking='means' is not valid; choose one of ['contribution', 'max', 'mean', "
                                    "'sum']. Did you mean 'mean'?"),
    ({"h2o": {"prompt_block": 0}}, "h2o.prompt_block=0"),
    ({"h2o": {"prompt_block": "images"}}, "h2o.prompt_block='images'"),
    ({"h2o": {"heavyy": 3}}, "unknown generation option 'h2o.heavyy'. Did you mean 'h2o.heavy'?"),
])
def test_bad_settings_name_the_key(options, key):
    with pytest.raises(OptionError) as caught:
        GenerationOptions().updated(**options)
    assert key in str(caught.value)


def test_a_partial_h2o_override_keeps_the_other_budget_keys():
    options = GenerationOptions(kv_cache="h2o", h2o={"heavy": 16}).updated(h2o={"recent": 0.5})
    assert options.h2o == H2OSettings(heavy=16, recent=0.5, sinks=4)


def test_the_infer_config_checks_the_h2o_keys():
    from vlm.cli import compose_config
    from vlm.infer import InferConfig

    config = load_config(InferConfig, compose_config("infer", ["generation.kv_cache=h2o", "generation.h2o.heavy=64"]))
    assert config.generation.h2o.heavy == 64 and isinstance(config.generation.h2o.heavy, int)
    with pytest.raises(ConfigError, match=r"^generation\.h2o\.recent=1.5 is not valid"):
        load_config(InferConfig, compose_config("infer", ["generation.h2o.recent=1.5"]))
    with pytest.raises(ConfigError, match=r"^generation\.top_p=2.0 is not valid"):  # named as the user typed it
        load_config(InferConfig, compose_config("infer", ["generation.top_p=2"]))


def test_chat_answers_stream_and_match_with_a_budget_holding_everything(tiny_chat_model):
    ask = [{"role": "user", "content": "What color is the shape? Tell me."}]
    dynamic = tiny_chat_model.generate(ask, temperature=0, max_new_tokens=12)
    h2o = tiny_chat_model.generate(ask, temperature=0, max_new_tokens=12, kv_cache="h2o",
                                   h2o={"heavy": 1.0, "recent": 12})
    assert h2o.token_ids == dynamic.token_ids
    in_blocks = tiny_chat_model.generate(ask, temperature=0, max_new_tokens=12, kv_cache="h2o",
                                         h2o={"heavy": 1.0, "recent": 12, "prompt_block": 3})
    assert in_blocks.token_ids == dynamic.token_ids
    with tiny_chat_model.stream(ask, temperature=0, max_new_tokens=12, kv_cache="h2o",
                                h2o={"heavy": 2, "recent": 3}) as stream:
        text = "".join(stream)
    assert stream.completion.text == text and stream.completion.output_tokens == 12


def test_a_chat_session_keeps_its_h2o_budget_across_turns(tiny_chat_model):
    chat = tiny_chat_model.session(temperature=0, max_new_tokens=4, kv_cache="h2o", h2o={"heavy": 2, "recent": 3})
    first, second = chat.send("What color is the shape?"), chat.send("And its shape?")
    assert (first.output_tokens, second.output_tokens) == (4, 4) and len(chat.messages) == 4
    assert chat.options.kv_cache == "h2o" and chat.options.h2o == H2OSettings(heavy=2, recent=3, sinks=4)
    # the second turn was answered with that budget: as generate answers the same conversation with it, and not as
    # the dynamic cache does (the 5-token budget binds on this longer prompt)
    asked = chat.messages[:3]
    with_budget = tiny_chat_model.generate(asked, temperature=0, max_new_tokens=4, kv_cache="h2o",
                                           h2o={"heavy": 2, "recent": 3})
    dynamic = tiny_chat_model.generate(asked, temperature=0, max_new_tokens=4)
    assert second.token_ids == with_budget.token_ids != dynamic.token_ids


def test_a_cancel_stops_a_prompt_read_in_blocks_at_the_next_pass(tiny_chat_model):
    """A client gone or Ctrl-C while a long prompt is read a token a pass: the answer ends there, not a pass per
    prompt token later."""
    cancel, passes = threading.Event(), []

    def count_and_cancel_at_the_third(*_):
        passes.append(1)
        if len(passes) == 3:
            cancel.set()

    hook = tiny_chat_model.model.lm.register_forward_pre_hook(count_and_cancel_at_the_third)
    try:
        ask = [{"role": "user", "content": "What color is the shape? " * 8}]
        answer = tiny_chat_model.generate(ask, cancel=cancel, temperature=0, max_new_tokens=8, kv_cache="h2o",
                                          h2o={"heavy": 2, "recent": 3, "prompt_block": 1})
    finally:
        hook.remove()
    assert answer.input_tokens > 40
    assert len(passes) == 3 and (answer.stop_reason, answer.output_tokens, answer.text) == ("cancelled", 0, "")


def test_models_h2o_cannot_run_on_are_refused_before_generating(lm):
    """GPT-NeoX's attention updates its cache without the kwargs H2O's scores travel in, sliding-window layers count
    their window in positions the evicted cache no longer holds, and Gemma 2 runs only its own eager attention
    (soft-capped): each is one OptionError naming kv_cache, before any token is generated."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    from vlm.generation.h2o import refuse_unsupported

    sizes = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4}
    refuse_unsupported(lm)  # Llama: supported
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(**sizes)).eval()
    with pytest.raises(OptionError, match=r"^kv_cache='h2o' cannot run on GPTNeoXForCausalLM: its attention does not "
                                          r"pass its arguments to the KV cache") as refused:
        refuse_unsupported(neox)
    assert refused.value.key == "kv_cache"
    # a sliding window, as Gemma 3's local layers have
    sliding = MistralForCausalLM(MistralConfig(**sizes, num_key_value_heads=2, sliding_window=16)).eval()
    with pytest.raises(OptionError, match=r"cannot run on MistralForCausalLM: it has sliding-window attention layers"):
        refuse_unsupported(sliding)
    refuse_unsupported(MistralForCausalLM(MistralConfig(**sizes, num_key_value_heads=2, sliding_window=None)).eval())
    gemma = Gemma2ForCausalLM(Gemma2Config(**sizes, num_key_value_heads=2, head_dim=8, attn_implementation="eager",
                                           layer_types=["full_attention"] * 2)).eval()  # no sliding layer
    with pytest.raises(OptionError, match=r"^kv_cache='h2o' cannot run on Gemma2ForCausalLM: transformers runs it "
                                          r"with its own eager attention only"):
        refuse_unsupported(gemma)


def test_a_sliding_window_longer_than_the_positions_is_no_window_to_h2o():
    """Phi-3.5 ships sliding_window=262144 for 131072 positions: a window that never takes effect is no reason to
    refuse H2O, and evicting answers as the same weights without a window do."""
    from transformers import MistralConfig, MistralForCausalLM

    from vlm.generation.h2o import refuse_unsupported

    sizes = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
             "initializer_range": 0.3}
    torch.manual_seed(0)
    windowed = MistralForCausalLM(MistralConfig(**sizes, sliding_window=128)).eval()
    plain = MistralForCausalLM(MistralConfig(**sizes, sliding_window=None)).eval()
    plain.load_state_dict(windowed.state_dict())
    refuse_unsupported(windowed)
    ids, budget = prompt(30), H2OBudget(heavy=3, recent=4, sinks=2)
    answer = greedy(windowed, ids, 12, cache=H2OCache(windowed, budget))
    assert torch.equal(answer, greedy(plain, ids, 12, cache=H2OCache(plain, budget)))
    assert not torch.equal(answer, greedy(plain, ids, 12))  # the budget binds: keys were evicted


def _hybrid_or_latent(kind: str):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Lfm2Config, Lfm2ForCausalLM

    sizes = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4}
    if kind == "latent":  # DeepSeek-V3's multi-head latent attention caches one compressed latent per token
        return DeepseekV3ForCausalLM(DeepseekV3Config(
            **sizes, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
            n_group=1, topk_group=1)).eval()
    model = Lfm2ForCausalLM(Lfm2Config(**sizes, num_key_value_heads=2, layer_types=["conv", "full_attention"])).eval()
    if kind == "hybrid, unnamed":  # a hybrid whose config does not list its layer kinds: found by running it
        model.config.layer_types = None
    return model


@pytest.mark.parametrize(("kind", "reason"), [
    ("hybrid", r"it has conv layers besides attention \(layer_types\), whose state H2O's cache does not hold"),
    ("hybrid, unnamed", r"it cannot run on H2O's cache of attention keys \(.+\)"),
    ("latent", r"its cache holds something other than the keys its attention reads \(a compressed latent\), so "
               r"the scores do not say which cached entries to keep"),
])
def test_hybrid_and_latent_attention_llms_are_refused_before_generating(kind, reason):
    """LFM2's convolution layers keep a state H2O's cache has no room for, and DeepSeek-V3 caches a latent its
    attention expands into the keys it scores: one OptionError naming kv_cache, not a transformers error mid-answer."""
    from vlm.generation.h2o import refuse_unsupported

    model = _hybrid_or_latent(kind)
    with pytest.raises(OptionError, match=rf"^kv_cache='h2o' cannot run on \w+: {reason}; use kv_cache='dynamic'$") \
            as refused:
        refuse_unsupported(model)
    assert refused.value.key == "kv_cache"


@pytest.mark.parametrize("family", ["mpt", "xglm"])
def test_models_whose_attention_is_their_own_code_are_refused_before_generating(family):
    """MPT and XGLM hand the cache its arguments, then compute attention in their own code, so the score hook never
    runs: one OptionError naming kv_cache, before any token (not an error after the first)."""
    from transformers import MptConfig, MptForCausalLM, XGLMConfig, XGLMForCausalLM

    from vlm.generation.h2o import refuse_unsupported

    model = (MptForCausalLM(MptConfig(vocab_size=97, d_model=32, n_heads=4, n_layers=2)) if family == "mpt" else
             XGLMForCausalLM(XGLMConfig(vocab_size=97, d_model=32, ffn_dim=64, num_layers=2, attention_heads=4))).eval()
    with pytest.raises(OptionError, match=r"cannot run on \w+: its attention is computed in its own code") as refused:
        refuse_unsupported(model)
    assert refused.value.key == "kv_cache"
