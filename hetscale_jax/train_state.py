"""flax's TrainState for a model that grows: the "growth" collection is carried beside the
params, so that the units it places are never dropped.

    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=tx)
    grads = jax.grad(lambda p: loss(state.apply_fn({"params": p, "growth": state.growth}, x)))(
        state.params)
    state = state.apply_gradients(grads=grads)
    state = state.grown(grow.grow(state.variables, plan, spectrum))   # a growth event

flax's own TrainState holds the params only, and `state.apply_fn({"params": params}, x)` would
apply unit parameters without the indices that place them (GrowableDense refuses that).
"""

from typing import Any

from flax.training import train_state
import optax

from hetscale_jax import grow, layers


class TrainState(train_state.TrainState):
  """flax's TrainState plus the growth collection (unit slots' neurons and depths: not
  trained). apply_gradients counts optim.adamw's steps only in slots that hold a unit; grown
  takes a growth event's variables and migrates the optimizer state."""

  growth: Any

  @classmethod
  def create(cls, *, apply_fn, variables, tx, **kwargs):
    """A state at step 0 for the model's `variables` (model.init's, grown or not)."""
    variables = layers.checked_variables(variables, "TrainState.create")
    return super().create(apply_fn=apply_fn, params=variables["params"], tx=tx,
                          growth=variables.get(layers.GROWTH_COLLECTION, {}), **kwargs)

  @property
  def variables(self) -> dict:
    """What apply_fn takes: {"params": ..., "growth": ...}."""
    return {"params": self.params, layers.GROWTH_COLLECTION: self.growth}

  def apply_gradients(self, *, grads, **kwargs):
    """One optimizer step; a transformation that takes extra arguments (optim.adamw) gets
    `live` (layers.live_slots), so that an empty slot never counts a step."""
    extra = ({"live": layers.live_slots(self.variables)}
             if isinstance(self.tx, optax.GradientTransformationExtraArgs) else {})
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **kwargs)

  def grown(self, variables):
    """This state with a growth event's `variables` (grow.grow's, grow.add_units'): their
    params and growth, and the optimizer state migrated (grow.migrate_opt_state)."""
    variables = layers.checked_variables(variables, "TrainState.grown")
    return self.replace(params=variables["params"],
                        growth=variables.get(layers.GROWTH_COLLECTION, {}),
                        opt_state=grow.migrate_opt_state(self.tx, self.opt_state,
                                                         variables["params"]))
