rule preprocess:
    input:
        raw_dataset_files,
    output:
        preprocessed("train", "val", "test"),
    params:
        data=config["data"],
    log:
        f"{LOGS}/preprocess.log",
    conda:
        "../../envs/data.yaml"
    script:
        "../../scripts/preprocess.py"
