"""The memory planner: cost model (pure functions), the MILP (the only PuLP import) and the
plan it emits. Never imports framework/, parallel/ or offload/, nor torch.

Public API:
    planner.search.make_plan(cfg) -> Plan           the whole search (NoFeasiblePlan if none)
    planner.layouts.enumerate_layouts(model, cluster, train, planner) -> [Layout]
    planner.layouts.check_layout(layout, model, cluster, train)   ConfigError if not runnable
    planner.memory.predict_stage_memory(plan, cfg) -> [PipelineRankMemory]  per pp rank
    planner.memory.predict_layer_activation_bytes(plan, cfg)      per layer, one micro-batch
    planner.timing.predict_step_time(plan, cfg) -> TimeEstimate
    planner.params.model_state_bytes / param_counts / total_params
    planner.schedules.inflight_profiles(schedule, pp, virtual_stages, num_microbatches)

Modules, in the order data flows: params, activations, flops -> costs (one layout's
coefficients) -> bounds (closed-form lower bounds) -> milp (one layout) -> search (all
layouts) -> assemble (per-layer plan, evaluated by memory and timing) -> explain (why
nothing fits); schedules (pipeline placement and in-flight counts), layouts (what the
runtime can execute), plot (plan.plot PNG).
"""
