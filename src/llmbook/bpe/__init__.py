"""Byte-level BPE, the tokenizer of GPT-2 and its successors (chapter 3).

Read the modules in this order: ``pretokenize`` (cut text into words),
``train`` (learn merges), ``tokenizer`` (encode and decode, and talk to
tiktoken and Hugging Face files), ``arrays`` (a corpus as a file of token ids).
"""

from llmbook.bpe.arrays import encode_to_array, load_tokens
from llmbook.bpe.pretokenize import CL100K_PATTERN, GPT2_PATTERN
from llmbook.bpe.tokenizer import Tokenizer
from llmbook.bpe.train import train_bpe

__all__ = ["CL100K_PATTERN", "GPT2_PATTERN", "Tokenizer", "encode_to_array", "load_tokens", "train_bpe"]
