rule preprocess:
    input:
        raw_dataset_files,
    output:
        preprocessed("train", "val", "test"),
    log:
        f"{LOGS}/preprocess.log",
    conda:
        "../../envs/data.yaml"
    params:
        data=config["data"],
    script:
        "../../scripts/preprocess.py"
