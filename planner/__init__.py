"""The memory planner: cost model (pure functions), the MILP (the only PuLP import) and the
plan it emits. Never imports framework/, parallel/ or offload/, nor torch.

Public API:
    planner.make.make_plan(cfg) -> Plan             the whole search (NoFeasiblePlan if none)
    planner.layouts.enumerate_layouts(model, cluster, train, planner) -> [Layout]
    planner.layouts.check_layout(layout, model, cluster, train)   ConfigError if not runnable
    planner.layouts.model_problems / plan_problems  the same rules as the runtime checks them
    planner.memory.predict_stage_memory(plan, cfg) -> [PipelineRankMemory]  per pp rank
    planner.memory.predict_layer_activation_bytes(plan, cfg)      per layer, one micro-batch
    planner.timing.predict_step_time(plan, cfg) -> TimeEstimate
    planner.params.model_state_bytes / param_counts / total_params
    planner.schedules.inflight_profiles(schedule, pp, virtual_stages, num_microbatches)

Modules, in the order data flows: params, activations, flops -> costs (one layout's
coefficients) -> bounds (closed-form lower bounds) -> milp (one layout; its result as plain
data in solution) -> search (all layouts) -> assemble (per-layer plan, evaluated by memory
and timing) -> explain (why nothing fits) -> make (make_plan: search, then assemble or
explain); modes (the recompute modes and their orders), schedules (pipeline placement,
in-flight counts, the latency formula), layouts (what the runtime can execute), plot
(plan.plot PNG); targets (what a DeepSpeed / accelerate config expresses, as a Plan),
deepspeed_config and accelerate_config (those files, written and read). Imports run one way
along that list: search never imports explain or make.
"""
