"""Measurement tooling: runs the runtime's train step (framework/runtime/step.py) on this
machine and measures where the bytes are. It sits beside the runtimes and uses them; nothing
in the runtime imports it.

`memplan profile` (launch/profile_command.py):
    setup        what runs for a plan: the most loaded stage, per-rank and scaled widths
    stage_step   StageStep: the StepPhases of that stage, stepped through run_train_step
    optimizer    the runtime's AdamW; fp32 master weights and moments for bf16 weights
    profile      run_profile: the steps, measured against planner.activations
    report       ProfileReport (the JSON of profile.out), relative errors
    saved_bytes  SavedTensorLedger: bytes saved for backward, per decoder layer
    trace        profile.mode=trace: the plan's runtime under FakeTensorMode with torch's
                 MemTracker / FSDPMemTracker (real widths, no memory)

The benchmarks (bench/*.py):
    device       the device as the planner should see it; the environment of a run
    live_bytes   LiveBytes: peak memory on the CPU (the stand-in for max_memory_allocated)
    trainee      Trainee: a whole model under a policy (none, full, save_on_cpu, plan)
    sweeps       longest trainable length and tokens/s per length and policy
    accuracy     predicted vs measured memory per configuration; the precision check
    policy_speed step time of memplan's policies against torch's own tools
    bench        the benchmarks' common arguments, config overrides, scale, MFU, JSON
    tables       plain-text tables and labels
"""
