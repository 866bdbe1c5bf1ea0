"""Dispatch/combine benchmarks: ``python -m moe_comm.bench``.

Every operation is timed side by side with its baseline in the same run: a raw
``torch.distributed.all_to_all_single`` that moves the same payload bytes with the same split sizes.
Byte counts:

- ``logical_bytes``: every row a rank receives, its own rows included (DeepEP's convention);
- ``wire_bytes``: only the rows that cross to another rank.

Both are per rank, averaged over ranks. Bandwidths divide them by the median time.
"""
