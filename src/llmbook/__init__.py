"""llmbook: the reference implementation behind *Build a Large Language Model From Scratch*.

Modules follow the book's chapters; a module introduced in chapter k imports
only modules of chapters <= k, so the code a reader has met is always complete.

Chapter 1 (what it takes): ``shapes`` (the one registry of named model shapes),
``planning``, ``units``; book infrastructure: ``data`` (datasets), ``seeding``,
``notebook`` (figures, tables, ``show``), ``exercises`` (self-checking exercises),
``errors`` (the one-line errors a reader sees).
Chapter 3: ``bpe``. Chapter 4: ``attention``, ``rope``. Chapter 5: ``layers``,
``model``, ``generate``, ``hf_convert``. Chapter 6: ``kernels`` (online softmax,
tiled FlashAttention in PyTorch and Triton). Chapter 7: ``loader``, ``losses``,
``optim``, ``schedule``, ``checkpoint``, ``train_config``, ``train``, ``pretrained``.
"""

__version__ = "0.1.0"
