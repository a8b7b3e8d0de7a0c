"""Chapter 8: distributed training, one module per idea (import the module you need; nothing heavy here).

- ``process_group``: join a process group from torchrun's environment.
- ``launcher``: ``spawn`` N local ranks from a notebook cell or a test (a tiny torchrun).
- ``collectives``: broadcast, all-reduce, reduce-scatter, all-gather; a hand-written ring all-reduce; alpha-beta.
- ``ddp``: data parallelism from scratch (bucketed gradient all-reduce overlapped with backward).
- ``zero``: ZeRO-1/2 from scratch (optimizer states and gradients sharded across ranks).
"""
