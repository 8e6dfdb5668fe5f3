"""Answer generation on top of transformers' `generate`: decoding options, stopping rules, streaming and results.

`vlm.chat` drives these pieces; none of them samples by hand.
"""
