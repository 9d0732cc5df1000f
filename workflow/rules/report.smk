rule summary:
    input:
        expand(f"{VARIANT_DIR}/eval.json", variant=VARIANTS),
    output:
        report(
            f"{RESULTS}/summary.csv",
            caption="../report/summary.rst",
            category="Summary",
        ),
    log:
        f"{LOGS}/summary.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../../scripts/summary.py"


rule plot_training_curves:
    input:
        expand(f"{RESULTS}/{DATASET}/{{model}}/metrics.csv", model=TRAINED),
    output:
        report(
            f"{RESULTS}/plots/training_curves.png",
            caption="../report/training_curves.rst",
            category="Training",
        ),
    log:
        f"{LOGS}/plot_training_curves.log",
    conda:
        "../../envs/report.yaml"
    params:
        models=TRAINED,
    script:
        "../../scripts/plot_training_curves.py"


rule plot_confusion:
    input:
        f"{VARIANT_DIR}/eval.json",
    output:
        report(
            f"{RESULTS}/plots/confusion/{{variant}}.png",
            caption="../report/confusion.rst",
            category="Evaluation",
            subcategory="{variant}",
        ),
    log:
        f"{LOGS}/plot_confusion/{{variant}}.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../../scripts/plot_confusion.py"


rule plot_tradeoffs:
    input:
        f"{RESULTS}/summary.csv",
    output:
        report(
            f"{RESULTS}/plots/tradeoffs.png",
            caption="../report/tradeoffs.rst",
            category="Summary",
        ),
    log:
        f"{LOGS}/plot_tradeoffs.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../../scripts/plot_tradeoffs.py"
