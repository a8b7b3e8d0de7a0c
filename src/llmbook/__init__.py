"""llmbook: the reference implementation behind *Build a Large Language Model From Scratch*.

Modules follow the book's chapters; a module introduced in chapter k imports
only modules of chapters <= k, so the code a reader has met is always complete.

Chapter 1 (what it takes): ``planning``, ``units``; book infrastructure:
``data`` (datasets), ``seeding``, ``notebook`` (figures, tables, ``show``),
``exercises`` (self-checking exercises).
"""

__version__ = "0.1.0"
