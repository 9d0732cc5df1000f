rule train:
    input:
        preprocessed("train", "val"),
        plan=allocation_plan,
    output:
        model=f"{RESULTS}/{DATASET}/{{model}}/model.pt",
        metrics=f"{RESULTS}/{DATASET}/{{model}}/metrics.csv",
    log:
        f"{LOGS}/train/{{model}}.log",
    conda:
        "../../envs/train.yaml"
    threads: usable_cores()
    resources:
        # For the cluster scheduler (profiles/slurm): GPUs, or with allocate.enabled the
        # planned GPUs, nodes, CPUs per GPU and runtime. Locally, --resources gpu=N caps them.
        **train_resources(),
    params:
        data_dir=data_dir_of_inputs,
        # Resumable checkpoints: outside the declared outputs so a failed job keeps them.
        work_dir=f"work/{DATASET}/{{model}}",
        model=lambda wildcards: config["models"][wildcards.model],
        train=config["train"],
        # One Dask worker per planned GPU with allocate.enabled.
        distributed=from_plan("distributed", config["distributed"]),
        predicted_train_seconds=from_plan("predicted_train_seconds", None),
    script:
        "../../scripts/train.py"
