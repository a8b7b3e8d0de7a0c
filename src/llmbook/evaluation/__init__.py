"""Chapter 11, evaluation from scratch: log-likelihoods of continuations, perplexity and bits per byte over a
document set with a sliding window, multiple-choice scoring exactly as lm-eval does it, and bootstrap intervals.

One module per idea: ``likelihood`` (the model call every metric is made of), ``perplexity``, ``multiple_choice``,
``bootstrap``. Import them directly (``from llmbook.evaluation.likelihood import loglikelihoods``).
"""
