"""certify: randomized smoothing and dual randomized smoothing with sound radii."""

from deploypipe.stage_index import StageInfo

STAGE = StageInfo(
    help="Certified L2 robustness by randomized smoothing (rs) or dual randomized smoothing (drs), sound radii",
    config="deploypipe.stages.certify.config:CertifyConfig",
    headline=("certified_acc_r0", "certified_acc_r0.5", "acr", "images", "seconds_per_image"),
    commands=("deploypipe.stages.certify.merge_command:certify_merge",))
