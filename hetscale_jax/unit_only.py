"""Unit-only training: what one growth event's new units can learn with the model around them
frozen.

The cleanest test of a selection rule: two rules that add as many units of one kind differ only
in where they put them. Train those units alone, for the same steps on the same batches with
the same optimizer, and the held-out loss each reaches says whose neurons were the better
places to grow, free of how the rest of the model then trains around them. A growth event
with growth.unit_only_steps > 0 measures this on a copy of the grown model (growth_event.py);
the run itself goes on from the grown model untouched.

    trainable = unit_only.new_slots(variables_before, variables_after)
    trained = unit_only.train(loss_fn, variables_after, trainable, batches, learning_rate)

Units live in packed slots that never move (layers.py), so an event's new units are the slots
that hold a unit after it and not before. Only those change, by Adam steps (no weight decay)
on their own gradient: every other parameter, the base and earlier events' units alike, stays
bit-identical.
"""

from collections.abc import Callable, Mapping
import functools

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hetscale_jax import layers


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep="/")


def new_slots(before, after) -> dict[str, jax.Array]:
  """{flat parameter path: [C] bool} for every unit field of `after`: the slots that hold a unit
  in `after` and not in `before` (variables of the same model before and after growth)."""
  live_before, live_after = _flat(layers.live_slots(before)), _flat(layers.live_slots(after))
  out = {}
  for name, live in live_after.items():
    if not layers.is_unit_param(name.rsplit("/", 1)[-1]):
      continue
    live = np.asarray(live)
    old = np.asarray(live_before.get(name, np.zeros(0, bool)))
    out[name] = jnp.asarray(live & ~np.pad(old, (0, live.shape[0] - old.shape[0])))
  return out


def _with_units(variables, units: Mapping[str, jax.Array]):
  params = _flat(variables["params"]) | dict(units)
  return {**variables, "params": traverse_util.unflatten_dict(params, sep="/")}


def _slot_mask(mask: jax.Array, like: jax.Array) -> jax.Array:
  return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


@functools.partial(jax.jit, static_argnums=0)
def _train(loss_fn: Callable, variables, trainable: dict, stacked_batches, learning_rate):
  """The unit fields of `variables` after one Adam step per leading entry of stacked_batches."""
  adam = optax.scale_by_adam()
  units = {name: _flat(variables["params"])[name] for name in trainable}
  grad_fn = jax.grad(lambda u, batch: loss_fn(_with_units(variables, u), batch))

  def step(carry, batch):
    units, adam_state = carry
    grads = {n: jnp.where(_slot_mask(trainable[n], g), g, 0) for n, g in grad_fn(units, batch).items()}
    updates, adam_state = adam.update(grads, adam_state)
    # Frozen slots are selected, not updated by zero: no arithmetic touches them.
    units = {n: jnp.where(_slot_mask(trainable[n], p), p - learning_rate * updates[n], p)
             for n, p in units.items()}
    return (units, adam_state), None

  (units, _), _ = jax.lax.scan(step, (units, adam.init(units)), stacked_batches)
  return units


def train(loss_fn: Callable, variables, trainable: Mapping[str, jax.Array], batches: list,
          learning_rate: float):
  """`variables` after one Adam step per batch, loss_fn(variables, batch), on the slots
  `trainable` marks (new_slots) alone; every other entry is bit-identical. loss_fn is a static
  argument of the compiled steps: pass the same object to reuse them."""
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *batches)
  units = _train(loss_fn, variables, dict(trainable), stacked, learning_rate)
  return _with_units(variables, units)


def mean_loss(loss_fn: Callable, variables, batches: list) -> float:
  """The mean of loss_fn(variables, batch) over `batches`, compiled (op by op, a few forward
  passes cost more than the compile). Every jax.jit of one loss_fn shares its programs."""
  compiled = jax.jit(loss_fn)
  return float(np.mean([float(compiled(variables, b)) for b in batches]))


def measure(loss_fn: Callable, before, after, batches: list, held_out: list,
            learning_rate: float, num_params: int) -> dict:
  """Unit-only training of the units `after` has beyond `before`, on `batches`: the mean
  loss on the `held_out` batches before and after it, and their drop per added parameter
  (`num_params` of them)."""
  trained = train(loss_fn, after, new_slots(before, after), batches, learning_rate)
  loss_before, loss_after = mean_loss(loss_fn, after, held_out), mean_loss(loss_fn, trained, held_out)
  return {"steps": len(batches), "loss_before": loss_before, "loss_after": loss_after,
          "drop_per_param": (loss_before - loss_after) / max(num_params, 1)}
