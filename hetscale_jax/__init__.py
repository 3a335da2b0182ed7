"""hetscale_jax: DeiT that grows skip-connected units where splitting eigenvalues are negative.

Public API (README, "Using it in research code"):
  `hetscale_jax.grow`: splitting_spectrum, select (Plan, EmptyPlanWarning, DEIT_KINDS), grow,
    add_units, reserve_slots, live_units, migrate_opt_state, predicted_split_change;
  `hetscale_jax.layers`: GrowableDense, switch_off_units, live_slots, live_units, whole_lists;
  `hetscale_jax.train_state.TrainState`: flax's TrainState with the growth collection;
  `hetscale_jax.optim`: adamw, with step counts per parameter and per unit slot;
  `hetscale_jax.spec`: from_variables, to_json, from_json, abstract_variables (restoring a grown
    model's checkpoint);
  `hetscale_jax.models.deit`: the DeiT model, create and params_from_timm.
"""
