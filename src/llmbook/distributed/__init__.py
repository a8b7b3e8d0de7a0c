"""Chapter 8: distributed training, one module per idea (import the module you need; nothing heavy here).

- ``process_group``: join a process group from torchrun's environment.
- ``launcher``: ``spawn`` N local ranks from a notebook cell or a test (a tiny torchrun).
- ``collectives``: broadcast, all-reduce, reduce-scatter, all-gather; a hand-written ring all-reduce; alpha-beta.
- ``ddp``: data parallelism from scratch (bucketed gradient all-reduce overlapped with backward).
- ``zero``: ZeRO-1/2 from scratch (optimizer states and gradients sharded across ranks).
- ``fsdp``: FSDP (ZeRO-3) from scratch (parameters sharded too, gathered one block at a time).
- ``sharding_memory``: bytes per rank of each strategy, by the ZeRO paper's formulas and measured.
- ``tensor_parallel``: Megatron's column- and row-parallel linears, attention split by heads (``parallelize_gpt``).
- ``pipeline``: GPipe and 1F1B schedules, the bubble, and a real pipeline run (``run_pipeline``).
- ``trainer``: the book's ``Trainer`` on PyTorch's DDP and FSDP2 under torchrun (``--set parallel=ddp|fsdp``).
- ``dcp_checkpoint``: sharded checkpoints with ``torch.distributed.checkpoint``, and their conversion to one file.
"""
