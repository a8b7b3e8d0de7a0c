"""Chapter 11, inference: making a trained model generate faster and smaller, without changing what it computes.

One module per idea: ``decode_cost`` (prefill vs decode and the roofline of
decoding), ``compiled`` (``torch.compile`` for decoding), ``scheduler``
(continuous batching), ``quantize`` (int8 and int4 weights) and
``speculative`` (a draft model proposes, the target verifies). Import the
module you need; this package imports nothing on its own.
"""
