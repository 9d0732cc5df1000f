rule evaluate:
    input:
        # Whatever stage produced the variant's model file: train now, prune/quantise later.
        model=f"{VARIANT_DIR}/model.pt",
        data=preprocessed("test"),
    output:
        f"{VARIANT_DIR}/eval.json",
    log:
        f"{LOGS}/evaluate/{{variant}}.log",
    conda:
        "../../envs/evaluate.yaml"
    threads: config["evaluate"]["threads"]
    params:
        data_dir=data_dir_of_inputs,
        evaluate=config["evaluate"],
    script:
        "../../scripts/evaluate.py"
