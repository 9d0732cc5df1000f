# Compression: prune -> finetune -> quantize. The variants (COMPRESSED, PRUNED, QUANTIZED)
# are named in common.smk from config["compress"] by aihpc.config.compress_stages.


wildcard_constraints:
    pruned=alternatives(PRUNED),
    quantized=alternatives(QUANTIZED),


rule prune:
    input:
        model=lambda wildcards: parent_model(wildcards.pruned),
    output:
        f"{RESULTS}/{DATASET}/{{pruned}}/pruned.pt",
    log:
        f"{LOGS}/prune/{{pruned}}.log",
    conda:
        "../../envs/compress.yaml"
    params:
        stage=lambda wildcards: COMPRESSED[wildcards.pruned].as_dict(),
        model=lambda wildcards: config["models"][COMPRESSED[wildcards.pruned].model],
        round_to=config["compress"]["round_to"],
        gradual_steps=config["compress"]["gradual_steps"],
    script:
        "../../scripts/prune.py"


rule finetune:
    input:
        model=f"{RESULTS}/{DATASET}/{{pruned}}/pruned.pt",
        data=preprocessed("train", "val"),
        # The distillation teacher (compress.distill): the trained model it was pruned from.
        teacher=lambda wildcards: f"{RESULTS}/{DATASET}/{COMPRESSED[wildcards.pruned].model}/model.pt",
    output:
        model=f"{RESULTS}/{DATASET}/{{pruned}}/model.pt",
        metrics=f"{RESULTS}/{DATASET}/{{pruned}}/metrics.csv",
    log:
        f"{LOGS}/finetune/{{pruned}}.log",
    conda:
        "../../envs/compress.yaml"
    threads: usable_cores()
    params:
        data_dir=data_dir_of_inputs,
        # Resumable checkpoints: outside the declared outputs so a failed job keeps them.
        work_dir=f"work/{DATASET}/{{pruned}}",
        finetune=lambda wildcards: finetune_config(
            config, COMPRESSED[wildcards.pruned]
        ).as_dict(),
        gradual_steps=config["compress"]["gradual_steps"],
        distill=config["compress"]["distill"],
    script:
        "../../scripts/finetune.py"


rule quantize:
    input:
        model=lambda wildcards: parent_model(wildcards.quantized),
        data=preprocessed("train"),
    output:
        model=f"{RESULTS}/{DATASET}/{{quantized}}/model.pt",
        program=f"{RESULTS}/{DATASET}/{{quantized}}/model.pt2",
        layers=report(
            f"{RESULTS}/{DATASET}/{{quantized}}/quant_layers.csv",
            caption="../report/quant_layers.rst",
            category="Compression",
            subcategory="{quantized}",
        ),
    log:
        f"{LOGS}/quantize/{{quantized}}.log",
    conda:
        "../../envs/compress.yaml"
    threads: usable_cores()
    params:
        data_dir=data_dir_of_inputs,
        stage=lambda wildcards: COMPRESSED[wildcards.quantized].as_dict(),
        calibration_samples=config["compress"]["calibration_samples"],
        calibration_seed=config["compress"]["calibration_seed"],
        observer=config["compress"]["observer"],
    script:
        "../../scripts/quantize.py"
