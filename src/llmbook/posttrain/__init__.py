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
    instructions, measure, sft   Chapter 9's data split, measurements (greedy and sampled), and SFT on the Trainer

Chapter 10:

    pairs         preference pairs (prompt, chosen, rejected): the polite data split, tokenized side by side
    logprobs      a response's log-probability under a model, masked to its tokens (summed or per token)
    politeness    the word list that counts impolite answers
    reward_model  a Bradley-Terry reward model: the SFT model with a scalar head
    best_of_n     n samples per prompt, the one the reward model scores highest
    dpo           Direct Preference Optimization: the loss (equal to TRL's), the implicit reward, the trainer
    rollouts      groups of sampled answers to the task's prompts, with their rewards
    onpolicy      preference pairs from the model's own samples (one passes the checker, one fails)
    grpo          Group Relative Policy Optimization: group advantages, the clipped loss with a KL term, the trainer

Nothing is imported here, so ``import llmbook.posttrain.templates`` costs only that module.
"""
