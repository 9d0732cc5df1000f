# aihpc: preprocess -> train -> [compress] -> evaluate -> summary/report.
# The rules live in workflow/rules/ (helpers in common.smk); the logic in the aihpc package.


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/allocate.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/compress.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_targets(),
