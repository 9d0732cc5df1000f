rule train:
    input:
        preprocessed("train", "val"),
    output:
        model=f"{RESULTS}/{DATASET}/{{model}}/model.pt",
        metrics=f"{RESULTS}/{DATASET}/{{model}}/metrics.csv",
    log:
        f"{LOGS}/train/{{model}}.log",
    conda:
        "../../envs/train.yaml"
    threads: usable_cores()
    resources:
        # GPUs for the cluster scheduler (profiles/slurm); the local profile ignores it.
        gpu=lambda wildcards: config["models"][wildcards.model].get("gpus", 0),
    params:
        data_dir=data_dir_of_inputs,
        # Resumable checkpoints: outside the declared outputs so a failed job keeps them.
        work_dir=f"work/{DATASET}/{{model}}",
        model=lambda wildcards: config["models"][wildcards.model],
        train=config["train"],
        distributed=config["distributed"],
    script:
        "../../scripts/train.py"
