"""Device mesh and shardings: data parallel over every device, optional FSDP (docs/method.md, "Scale").

The mesh has axes ("data", "fsdp"). A batch is split over both axes. With fsdp > 1 every
array with an axis divisible by the fsdp size is split along its largest such axis over
"fsdp" (params and the optimizer moments alike, since the rule only looks at shapes);
everything else is replicated. The rule needs no knowledge of the model, so the parameters
a growth event adds get their shardings the same way.
"""

import collections
from collections.abc import Iterable, Iterator
import itertools

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

BATCH_AXES = ("data", "fsdp")


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  if len(devices) % fsdp:
    raise ValueError(f"config.mesh.fsdp={fsdp} must divide the number of devices ({len(devices)})")
  return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _array_spec(shape, fsdp: int) -> P:
  if fsdp == 1:
    return P()
  candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  return P(*[("fsdp" if a == axis else None) for a in range(len(shape))])


def tree_shardings(mesh: Mesh, tree):
  """NamedSharding of every leaf of `tree` (arrays or ShapeDtypeStructs) by the FSDP rule."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, _array_spec(np.shape(x), fsdp)), tree)


def global_batch(mesh: Mesh, local_batch):
  """Assembles each process's numpy batch into one global array sharded over the mesh."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def prefetch_to_mesh(local_batches: Iterable, mesh: Mesh, size: int = 2) -> Iterator:
  """Global batches on the mesh, `size` ahead of the consumer.

  Each batch's host-to-device copy is started (asynchronously) `size` batches before it is
  used, so it overlaps the steps the devices are running: flax.jax_utils.prefetch_to_device's
  pattern, with the mesh's batch sharding instead of pmap's device axis.
  """
  local_batches = iter(local_batches)
  queue = collections.deque()

  def enqueue(n: int):
    for batch in itertools.islice(local_batches, n):
      queue.append(global_batch(mesh, batch))
  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)


def put(tree, shardings):
  """jax.device_put of `tree` onto `shardings`, also where these span several processes.

  A leaf held by this process alone (numpy, or an array on its own devices, as the index
  arrays a growth event builds on the host) holds the whole value on every process; it is
  assembled shard by shard from that value, since device_put of a process-local array onto
  the devices of several processes gives an array whose shards orbax cannot read.
  """
  def put_leaf(x, s):
    if s.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
      return jax.device_put(x, s)
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, s, lambda index: value[index])
  return jax.tree.map(put_leaf, tree, shardings)


def host_value(tree):
  """Every leaf's whole value as numpy, on every process.

  jax.device_get only reads arrays whose every shard this process holds (or a replica of
  them); an array sharded over the devices of several processes is gathered first.
  """
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
  return jax.tree.map(get, tree)
