"""Context parallelism: attention over sequences split across the mesh's "sequence" axis.

Where the active rules split `act_seq` over a "sequence" axis of s > 1 devices (`mesh.sequence`),
each device holds T / s consecutive positions of every sequence: their hidden states, queries,
keys, values and logits. Everything but attention is per position and needs no communication.
Attention runs under `jax.shard_map` (batch and heads stay split over the other axes as the
rules put them): each device all-gathers the keys and values of the whole sequence over
"sequence", and attends its own T / s query rows, which are rows i * T / s.. of the mask on the
device with index i, to all of them. The backward of the all-gather, a reduce-scatter of the
keys' and values' gradients, is jax's. In the shards, lower-case letters are local sizes:
b = B / batch shards, t = T / s, s = S / s (only the gathered keys have all S).

The all-gather is the simple choice: per device and layer it holds the whole sequence's keys and
values (2 * T * K * H values), which is small next to the activations when K * H << D (grouped-
query attention). A ring (ppermute one block of keys at a time) would hold 1 / s of that.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
from jax.sharding import Mesh, PartitionSpec as P

from jaxlm import sharding
from jaxlm.sharding import SEQUENCE


def splits(mesh: Optional[Mesh], T: int, S: int) -> bool:
    """Whether attention of T queries over S keys runs sequence-sharded on `mesh`
    (`jaxlm.sharding.sequence_mesh()`): its "sequence" axis divides both. Otherwise (a decode step,
    a prompt of odd length) the sequence is not split and attention runs whole on every device."""
    return mesh is not None and T % mesh.shape[SEQUENCE] == 0 and S % mesh.shape[SEQUENCE] == 0


def attend(mesh: Mesh, rules: str, local: Callable, q_BTNH, k_BSKH, v_BSKH, dense_BTS=None):
    """Attention with queries, keys, values (and the dense mask's rows, when there is one) split
    along the sequence over "sequence": `local(q_btNH, k_bSKH, v_bSKH, dense_btS, row0)` runs on
    each device's t = T / s query rows starting at row0, with the keys and values all-gathered.

    The map is manual over every mesh axis, each input split as the `rules` split activations
    (batch b = B / batch shards; heads over "tensor" where both N and K divide): left to the
    partitioner, the other axes come out replicated inside the map.
    """
    B, T, N, _ = q_BTNH.shape
    batch = sharding.spec(mesh, rules, (B,), ("act_batch",))[0]
    q_heads, kv_heads = (sharding.spec(mesh, rules, (n,), ("act_heads",))[0] for n in (N, k_BSKH.shape[2]))
    qkv = P(batch, SEQUENCE, q_heads if kv_heads is not None else None, None)  # query head n uses kv head n // G

    def shard(q_btNH, k_bsKH, v_bsKH, *dense_btS):
        k_bSKH = jax.lax.all_gather(k_bsKH, SEQUENCE, axis=1, tiled=True)
        v_bSKH = jax.lax.all_gather(v_bsKH, SEQUENCE, axis=1, tiled=True)
        row0 = jax.lax.axis_index(SEQUENCE) * q_btNH.shape[1]
        return local(q_btNH, k_bSKH, v_bSKH, dense_btS[0] if dense_btS else None, row0)

    args, specs = (q_BTNH, k_BSKH, v_BSKH), (qkv,) * 3
    if dense_BTS is not None:  # [B or 1, T, S]
        args, specs = args + (dense_BTS,), specs + (P(batch if dense_BTS.shape[0] == B else None, SEQUENCE),)
    # check_vma=False: `local`'s loops start from zeros that jax's varying-axes types would need cast
    # to vary over the mesh; the tests check the values and gradients against the unsharded ones.
    return jax.shard_map(shard, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)(*args)
