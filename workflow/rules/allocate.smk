# GPU allocation of the training sweep (allocate.enabled; aihpc.allocate): profile each
# model -> fit the throughput model -> plan one configuration per model. The train rule
# reads the plan (common.smk: allocation_plan, from_plan, train_resources).


rule profile:
    input:
        preprocessed("train", "val"),
    output:
        f"{PLAN_DIR}/profile/{{model}}.csv",
    log:
        f"{LOGS}/profile/{{model}}.log",
    conda:
        "../../envs/train.yaml"
    # All cores, like train: the runs split them among their Dask workers as train does,
    # and timings need the node to themselves.
    threads: usable_cores()
    resources:
        gpu=profile_gpus(),
    params:
        data_dir=data_dir_of_inputs,
        scratch_dir=f"work/{DATASET}/profile/{{model}}",
        model=lambda wildcards: config["models"][wildcards.model],
        train=config["train"],
        distributed=config["distributed"],
        profile=ALLOCATE["profile"],
    script:
        "../../scripts/profile.py"


rule fit_scaling:
    input:
        expand(f"{PLAN_DIR}/profile/{{model}}.csv", model=MODELS),
    output:
        throughput=f"{PLAN_DIR}/throughput.csv",
        params=f"{PLAN_DIR}/fit.json",
    log:
        f"{LOGS}/fit_scaling.log",
    conda:
        "../../envs/allocate.yaml"
    params:
        cluster=ALLOCATE["cluster"],
        train=config["train"],
        models=config["models"],
        # Only a Dask cluster reached by address spans nodes (aihpc.distributed).
        multi_node=config["distributed"]["cluster"] == "connect",
    script:
        "../../scripts/fit_scaling.py"


rule allocate:
    input:
        throughput=f"{PLAN_DIR}/throughput.csv",
        stats=f"{DATA_DIR}/stats.json",
    output:
        plan=PLAN,
        table=f"{PLAN_DIR}/allocation.csv",
        gantt=report(
            f"{PLAN_DIR}/gantt.png",
            caption="../report/allocation.rst",
            category="Allocation",
        ),
    log:
        f"{LOGS}/allocate.log",
    conda:
        "../../envs/allocate.yaml"
    # Only what the plan depends on: a new plan retrains every model (an input of train).
    params:
        cluster=ALLOCATE["cluster"],
        objective=ALLOCATE["objective"],
        solver=ALLOCATE["solver"],
        deadline_s=ALLOCATE["deadline_s"],
        budget_gpu_hours=ALLOCATE["budget_gpu_hours"],
        train=config["train"],
        models=config["models"],
    script:
        "../../scripts/allocate.py"
