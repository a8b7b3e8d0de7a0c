"""Post-training (Chapters 9 and 10): from a base model that continues text to one that follows instructions.

One module per idea, in the order the chapters use them:

    templates   conversations as text: the Alpaca and ChatML templates, ``apply_template`` and ``parse``
    vocab       new special tokens: ``add_special_tokens`` and ``resize_token_embeddings`` (mean init)
    masking     ``tokenize_example``: ids and labels, -100 on everything but the responses
    collate     a batch of examples: right padding to train, left padding to generate
    packing     several examples in one row: block-diagonal attention and positions that restart
    lora        low-rank adapters on the linears of a frozen model (``LoRALinear``, ``apply_lora``)
    tasks       the verifiable instruction-following task: prompts and an exact checker
    chat        replies of a fine-tuned model: the template's prompt, stopping at its end token (``reply``)

Nothing is imported here, so ``import llmbook.posttrain.templates`` costs only that module.
"""
