"""The memory planner: cost model (pure functions), the MILP (the only PuLP import) and the
plan it emits. Never imports framework/, parallel/ or offload/."""
