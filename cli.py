"""main.py's command line: every flag, its help, and the checks that need no data.

Kept apart from main.py so that the sweep script and the tests can build and
validate a configuration without starting a run.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

from data import DATASETS
from losses import LOSSES
from mixup import MIX_RULES
from models import MODELS

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("multistep", "cosine", "constant")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
EVAL_PRECISIONS = ("auto", "float32", "tf32", "bf16")
SWITCH_PROB = 0.5  # timm's Mixup default
MAX_SEED = 2**63 - 1  # numpy and torch both take any seed in 0..2^63-1
DEFAULT_FEATURE_EPOCH_COUNT = 8
# Defaults that depend on the dataset. The quick digits run is tuned so that
# collapse shows within a CPU minute (weight decay drives NC1 down under mixup);
# the image datasets get the recipe of Papyan, Han & Donoho 2020 (SGD, wd 5e-4).
# NC is measured after every digits epoch (a pass costs milliseconds); the image datasets measure
# at Papyan's log-spaced epochs, where the dynamics are (their NC figures use a log epoch axis).
QUICK_RECIPE = {"model": "mlp", "epochs": 100, "lr": 0.05, "weight_decay": 1e-2, "nc_epochs": "all"}
PAPER_RECIPE = {"model": "resnet18", "epochs": 350, "lr": 0.1, "weight_decay": 5e-4, "nc_epochs": "log"}
# --nc-epochs log: about this many epochs after epoch 0 (Papyan, Han & Donoho 2020 measured 50 of 350).
LOG_NC_EPOCH_COUNT = 50
# --checkpoint-every as a duration: a number and one of these units.
DURATION_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}
DEFAULT_CUDA_CHECKPOINT_EVERY = "10min"  # a resume repeats at most this much; a WRN-40-10 checkpoint is 0.45 GB
RECIPES = {"digits": QUICK_RECIPE}  # log-spaced feature snapshots when --feature-epochs is not given
# Flags that may change when a run is resumed; any other difference is refused.
# --nc-epochs only chooses which epochs are measured: training, and every measured record, stay as they are.
# eval_precision changes measurements only, and every record says which precision its pass used (a run
# saved before --eval-precision auto became the default resumes under it).
RESUMABLE_CHANGES = frozenset({"epochs", "resume", "overwrite", "device", "checkpoint_every", "download",
                               "data_dir", "progress", "out_dir", "run_name", "compile", "compile_mode",
                               "nc_epochs", "eval_precision"})


class UsageError(Exception):
    """A flag value that cannot run; main.py prints it on one line and exits 2."""


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where the help does not already say what the default is."""

    def _get_help_string(self, action):
        # identity, not equality: 0 and 0.0 equal False, yet "(default: 0)" is worth showing
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors in one line on stderr (no usage block) and exits 2."""

    def __init__(self, *args, **kwargs):
        # A prefix of a flag is an error, not that flag: `--epoch 1` must not become `--epochs 1`.
        # Subparsers are made with this class too, so they inherit it.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..2^63-1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _rule_list(text: str) -> List[str]:
    rules = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [rule for rule in rules if rule not in MIX_RULES]
    if unknown or not rules:
        raise argparse.ArgumentTypeError(f"takes {' and/or '.join(MIX_RULES)}, got {text!r}")
    return rules


def _nc_epochs(text: str) -> str:
    """all, log, every:K or E1,E2,... (checked here, resolved against --epochs by nc_epoch_schedule)."""
    if text in ("all", "log"):
        return text
    if text.startswith("every:"):
        every = text[len("every:"):]
        if not every.isdigit() or int(every) < 1:
            raise argparse.ArgumentTypeError(f"every:K needs a whole number K >= 1, got {text}")
        return text
    negative = [e for e in _int_list(text) if e < 0]
    if negative or not _int_list(text):
        raise argparse.ArgumentTypeError(f"must be all, log, every:K or epochs >= 0, got {text}")
    return text


def _checkpoint_every(text: str):
    """A positive number of epochs (int) or a duration such as 30s, 10min, 1.5h (kept as written)."""
    if text.isdigit():
        return positive_int(text)
    duration_seconds(text)  # raises ValueError, which argparse reports as an invalid value
    return text


def duration_seconds(text: str) -> float:
    """Seconds of a duration NUMBER+UNIT (UNIT in DURATION_UNITS); ValueError otherwise."""
    for unit, scale in sorted(DURATION_UNITS.items(), key=lambda item: -len(item[0])):
        if text.endswith(unit):
            value = float(text[:-len(unit)])
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"must be a positive duration, got {text}")
            return value * scale
    raise ValueError(f"must be a number of epochs or a duration like 10min, got {text}")


def checkpoint_policy(value) -> tuple:
    """(every K epochs or None, every S seconds or None) of a resolved --checkpoint-every."""
    if isinstance(value, int):
        return value, None
    return None, duration_seconds(value)


def _int_list(text: str) -> List[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def _float_list(text: str) -> List[float]:
    return [float(item) for item in text.split(",") if item.strip()]


for _parser_type, _name in ((positive_int, "positive int"), (nonnegative_int, "non-negative int"), (_seed, "seed"),
                            (_positive_float, "positive float"), (_nonnegative_float, "non-negative float"),
                            (_fraction, "fraction"), (_probability, "probability"),
                            (_rule_list, "comma-separated rule list"), (_int_list, "comma-separated int list"),
                            (_float_list, "comma-separated float list"),
                            (_nc_epochs, "all, log, every:K or E,E,..."),
                            (_checkpoint_every, "number of epochs or duration (30s, 10min, 1h)")):
    _parser_type.__name__ = _name  # argparse names the type in "invalid <type> value" messages


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="main.py", formatter_class=DefaultsFormatter,
        description="Train a classifier with mixup and measure neural collapse (NC1-NC4) at the epochs of --nc-epochs.")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="digits", choices=sorted(DATASETS), metavar="NAME",
                      help=f"dataset: {', '.join(sorted(DATASETS))} (digits is bundled with scikit-learn)")
    data.add_argument("--data-dir", default="./data", metavar="DIR", help="where torchvision datasets live")
    data.add_argument("--download", action="store_true", help="download the dataset into --data-dir if missing")
    data.add_argument("--samples-per-class", type=positive_int, default=None, metavar="N",
                      help="train on the first N samples of every class (balanced subset); default: all")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                      help="random crop (4-pixel padding) + horizontal flip; default on for CIFAR/SVHN, off otherwise")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, choices=sorted(MODELS), metavar="NAME",
                       help=f"architecture: {', '.join(sorted(MODELS))}; default: {QUICK_RECIPE['model']} for digits, "
                            f"{PAPER_RECIPE['model']} otherwise")
    model.add_argument("--width", type=_positive_float, default=1.0, metavar="X",
                       help="multiplies the channels (conv nets), hidden units (mlp) or head dimension (ViT)")
    model.add_argument("--etf-classifier", action="store_true",
                       help="fix the last layer at a simplex ETF with unit-norm rows (frozen, no bias)")

    loss = parser.add_argument_group("loss")
    loss.add_argument("--loss", default="cross_entropy", choices=sorted(LOSSES), metavar="NAME",
                      help=f"loss over logits and soft targets: {', '.join(sorted(LOSSES))}")
    loss.add_argument("--label-smoothing", type=_fraction, default=0.0, metavar="EPS",
                      help="label smoothing of every loss: soft targets t become (1 - EPS) t + EPS / C")
    loss.add_argument("--mse-scale", type=_positive_float, default=1.0, metavar="KAPPA",
                      help="scale of the one-hot target of mse, mae and smooth_l1")
    loss.add_argument("--focal-gamma", type=_nonnegative_float, default=2.0, metavar="GAMMA",
                      help="focusing parameter of focal")

    mix = parser.add_argument_group("mixup")
    mix.add_argument("--mixup-alpha", type=_nonnegative_float, default=1.0, metavar="ALPHA",
                     help="lambda ~ Beta(ALPHA, ALPHA); 0 turns mixup off")
    mix.add_argument("--mixup-per-sample", action="store_true",
                     help="draw lambda per sample instead of once per batch (with CutMix also each sample's box, "
                          "rule and --mix-prob choice)")
    mix.add_argument("--mixup-layer", default="input", metavar="STAGE",
                     help="where to mix: input (mixup), a stage name of the model (manifold mixup: that stage's "
                          "output is mixed; an unknown name lists the model's stages), or random (per batch, one of the input "
                          "and the first two stages after the stem, as Verma et al. 2019)")
    mix.add_argument("--cutmix-alpha", type=_nonnegative_float, default=0.0, metavar="A",
                     help="CutMix (Yun et al. 2019): lambda ~ Beta(A, A), a box of area 1 - lambda (centre uniform, "
                          "clipped at the border) pasted from the partner image; the targets weigh the partner by "
                          "the pasted box's true area; 0 turns CutMix off")
    mix.add_argument("--mix-prob", type=_probability, default=1.0, metavar="P",
                     help="probability that a batch (a sample, with --mixup-per-sample) is mixed at all")
    mix.add_argument("--switch-prob", type=_probability, default=SWITCH_PROB, metavar="S",
                     help="with both --mixup-alpha and --cutmix-alpha > 0: probability that a mixed batch (sample) "
                          "uses CutMix instead of mixup, as timm's Mixup")
    mix.add_argument("--feature-mix", type=_rule_list, default=None, metavar="RULE[,RULE]",
                     help="mixing rules of the feature epochs' class-triple points: mixup (interpolation) and/or "
                          "cutmix (a box of area 1 - lambda, placed from --seed); default: the run's rules "
                          "(mixup for a run without mixing)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, metavar="NAME",
                       help=f"optimiser: {', '.join(OPTIMIZERS)}")
    optim.add_argument("--lr", type=_positive_float, default=None, metavar="LR",
                       help=f"initial learning rate; default: {QUICK_RECIPE['lr']} for digits, {PAPER_RECIPE['lr']} otherwise")
    optim.add_argument("--momentum", type=_nonnegative_float, default=0.9, metavar="M", help="SGD momentum")
    optim.add_argument("--weight-decay", type=_nonnegative_float, default=None, metavar="WD",
                       help=f"weight decay; default: {QUICK_RECIPE['weight_decay']} for digits, "
                            f"{PAPER_RECIPE['weight_decay']} otherwise")
    optim.add_argument("--scheduler", default="multistep", choices=SCHEDULERS, metavar="NAME",
                       help=f"learning-rate schedule per epoch: {', '.join(SCHEDULERS)}")
    optim.add_argument("--milestones", type=_float_list, default=[0.3, 0.5, 0.9], metavar="F,F,...",
                       help="multistep milestones as fractions of --epochs, rounded to epochs; milestones that "
                            "round to the same epoch move to the following epochs, so the rate never drops twice at once")
    optim.add_argument("--gamma", type=_positive_float, default=0.1, metavar="G",
                       help="multistep factor applied at each milestone")
    optim.add_argument("--batch-size", type=positive_int, default=128, metavar="B",
                       help="global training batch size (split across processes under torchrun); a last batch "
                            "of a single sample is dropped, since batch norm cannot train on one sample")
    optim.add_argument("--epochs", type=positive_int, default=None, metavar="E",
                       help=f"training epochs; default: {QUICK_RECIPE['epochs']} for digits, {PAPER_RECIPE['epochs']} otherwise")
    optim.add_argument("--seed", type=_seed, default=0, metavar="S",
                       help="seeds the model, shuffling, augmentation, mixup and the feature triple")

    measure = parser.add_argument_group("measurement")
    measure.add_argument("--nc-epochs", type=_nc_epochs, default=None, metavar="all|log|every:K|E,E,...",
                         help=f"epochs with an NC pass (the clean training split's loss, accuracy and NC metrics), "
                              f"always with epoch 0, the feature epochs and the last: all, log (about "
                              f"{LOG_NC_EPOCH_COUNT} log-spaced epochs, Papyan et al.'s list at 350 epochs), every:K "
                              f"or a list; the test split is evaluated every epoch; default: "
                              f"{QUICK_RECIPE['nc_epochs']} for digits, {PAPER_RECIPE['nc_epochs']} otherwise")
    measure.add_argument("--nc-every", type=positive_int, default=None, metavar="K",
                         help="replaced by --nc-epochs every:K (refused)")
    measure.add_argument("--nc-layers", default="", metavar="all|STAGE,...",
                         help="also measure NC below the classifier at these stages of the model (all: every stage, "
                              "input to output), on the clean training split in the same forward; default: none")
    measure.add_argument("--eval-batch-size", type=positive_int, default=1024, metavar="B",
                         help="batch size of the clean evaluation / NC pass")
    measure.add_argument("--feature-epochs", type=_int_list, default=None, metavar="E,E,...",
                         help=f"epochs (0 = before training) whose features are pickled; "
                              f"default: {DEFAULT_FEATURE_EPOCH_COUNT} log-spaced epochs ending at the last")
    measure.add_argument("--feature-samples-per-class", type=nonnegative_int, default=100, metavar="N",
                         help="clean training samples per class in each features pickle; 0 means all")
    measure.add_argument("--feature-classes", type=_int_list, default=None, metavar="A,B,C",
                         help="the class triple whose mixup points are pickled; default: drawn with --seed")
    measure.add_argument("--feature-lambdas", type=positive_int, default=21, metavar="L",
                         help="number of lambda values on the grid 0..1 for the mixup points")
    measure.add_argument("--feature-pairs", type=positive_int, default=20, metavar="P",
                         help="image pairs per pair type (same class, different classes) of the triple")
    measure.add_argument("--eval-precision", default="auto", choices=EVAL_PRECISIONS, metavar="P",
                         help="precision of the measurement forward (NC pass, clean loss/accuracy, feature "
                              "pickles): auto (the default: tf32 on CUDA, with every NC pass checked against the "
                              "floor its rounding puts under NC1 (nc1_floor) and redone in float32 when NC1 comes "
                              "within 100x of it; float32 on a CPU), float32 (exact: no TF32), tf32 (float32 with "
                              "TF32 tensor-core products on CUDA; 5x faster on an H100, 10 mantissa bits) or bf16 "
                              "autocast (8 bits: a rounding floor under NC1 of about 1e-6 (C-1) |h|^2 / "
                              "|mu_c - mu_G|^2); training uses --amp")
    measure.add_argument("--feature-mode", default="eval", choices=("eval", "train"), metavar="MODE",
                         help="batch norm mode for the mixup points: eval (running statistics) or train "
                              "(batch statistics, as in Fisher et al. 2024; running statistics are left untouched)")

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default="auto", metavar="DEV", help="auto, cpu, cuda or cuda:N")
    runtime.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                         help="bf16 autocast for forward passes; default on for CUDA, off on CPU")
    runtime.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                         help="torch.compile the training step, eager if compilation fails (drops the ragged last "
                              "batch for a fixed shape); default on for CUDA, off on CPU")
    runtime.add_argument("--compile-mode", default="reduce-overhead", choices=COMPILE_MODES, metavar="MODE",
                         help=f"torch.compile mode with --compile: {', '.join(COMPILE_MODES)} "
                              "(reduce-overhead replays CUDA graphs: fewer kernel launches per step)")
    runtime.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                         help="channels_last memory format for the conv nets; default on for CUDA, off on CPU")
    runtime.add_argument("--deterministic", action="store_true",
                         help="deterministic algorithms and no cudnn autotuning (slower on GPU)")
    runtime.add_argument("--sync-bn", action="store_true", help="synchronise batch norm across torchrun processes")
    runtime.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="per-epoch progress bar; default on when stderr is a terminal")
    runtime.add_argument("--allow-nonfinite", action="store_true",
                         help="keep training after a non-finite training loss instead of stopping")

    output = parser.add_argument_group("output")
    output.add_argument("--out-dir", default="runs", metavar="DIR", help="parent folder of run folders")
    output.add_argument("--run-name", default=None, metavar="NAME",
                        help="run folder name; default: <dataset>_<model>_<loss>_a<alpha>_s<seed>, with "
                             "_cut<A> (CutMix), _p<P> (--mix-prob), _sw<S> (--switch-prob, or both rules) and "
                             "_mix-<stage> (manifold mixup) before _s<seed>")
    output.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    output.add_argument("--resume", action="store_true",
                        help="continue the run folder from its last checkpoint up to --epochs")
    output.add_argument("--checkpoint-every", type=_checkpoint_every, default=None, metavar="K|DURATION",
                        help=f"write checkpoint.pt every K epochs, or after the first epoch that ends DURATION "
                             f"(30s, 10min, 1h) after the last checkpoint; always at the end and at a stop "
                             f"request; default: {DEFAULT_CUDA_CHECKPOINT_EVERY} on CUDA, 1 (epoch) otherwise")
    return parser


def default_run_name(args) -> str:
    place = "" if args.mixup_layer == "input" else f"_mix-{args.mixup_layer}"
    return f"{args.dataset}_{args.model}_{args.loss}_a{args.mixup_alpha:g}{mixing_name(args)}{place}_s{args.seed}"


NAMED_MIXING_FLAGS = ("cutmix_alpha", "mix_prob", "switch_prob")  # spelled by mixing_name in every default name


def mixing_name(args) -> str:
    """The run name's part for CutMix and the rule switch; empty for plain mixup (today's names)."""
    parts = [f"_cut{args.cutmix_alpha:g}"] if args.cutmix_alpha > 0 else []
    if args.mix_prob != 1:
        parts.append(f"_p{args.mix_prob:g}")
    if args.switch_prob != SWITCH_PROB or (args.cutmix_alpha > 0 and args.mixup_alpha > 0):
        parts.append(f"_sw{args.switch_prob:g}")
    return "".join(parts)


def default_feature_epochs(epochs: int) -> List[int]:
    import numpy as np

    spaced = np.geomspace(1, epochs, num=min(DEFAULT_FEATURE_EPOCH_COUNT, epochs))
    return sorted({int(round(e)) for e in spaced} | {epochs})


def log_nc_epochs(epochs: int, count: Optional[int] = None) -> List[int]:
    """About `count` log-spaced epochs in 1..epochs, the last included: Papyan et al.'s list at 350.

    Every epoch while a log spacing would step by less than one epoch; from the
    first epoch s whose geometric step s (r - 1) reaches one epoch, with
    r = (epochs / s)^(1 / (count - s)), the count - s + 1 points of the geometric
    sequence from s to `epochs`, rounded. At 350 epochs s = 11 and the result is
    the epoch_list of Papyan, Han & Donoho's notebook (1-14, 16, 17, 19, ..., 320, 350).
    """
    count = count or LOG_NC_EPOCH_COUNT
    if epochs <= count:
        return list(range(1, epochs + 1))
    import numpy as np

    start = next(s for s in range(1, count) if s * ((epochs / s) ** (1.0 / (count - s)) - 1.0) >= 1.0)
    spaced = np.round(np.geomspace(start, epochs, count - start + 1)).astype(int).tolist()
    return list(range(1, start)) + spaced


def nc_epoch_schedule(spec: str, epochs: int, feature_epochs) -> List[int]:
    """The sorted epochs with an NC pass: those of --nc-epochs, plus 0, the last and every feature epoch."""
    if spec == "all":
        chosen = range(epochs + 1)
    elif spec == "log":
        chosen = log_nc_epochs(epochs)
    elif spec.startswith("every:"):
        every = int(spec[len("every:"):])
        chosen = range(0, epochs + 1, every)
    else:
        chosen = [e for e in _int_list(spec) if e <= epochs]  # a list may name epochs of a later --epochs
    return sorted(set(chosen) | {0, epochs} | set(feature_epochs))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and check everything that needs no data; UsageError on a bad combination."""
    args = build_parser().parse_args(argv)
    for key, value in RECIPES.get(args.dataset, PAPER_RECIPE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.nc_every is not None:
        raise UsageError(f"--nc-every was replaced by --nc-epochs: pass --nc-epochs every:{args.nc_every}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if args.cutmix_alpha > 0 and args.mixup_layer != "input":
        raise UsageError(f"--cutmix-alpha cuts boxes of input pixels; it cannot mix at --mixup-layer {args.mixup_layer}")
    if args.run_name is None:
        args.run_name = default_run_name(args)
    if "/" in args.run_name or args.run_name in ("", ".", ".."):
        raise UsageError(f"--run-name {args.run_name!r} must be a plain folder name")
    if any(not 0 < m < 1 for m in args.milestones) or args.milestones != sorted(args.milestones):
        raise UsageError(f"--milestones must be increasing fractions in (0, 1), got {args.milestones}")
    if args.feature_epochs is not None:
        outside = [e for e in args.feature_epochs if not 0 <= e <= args.epochs]
        if outside:
            raise UsageError(f"--feature-epochs {outside} outside 0..{args.epochs} (--epochs)")
    info = DATASETS[args.dataset][0]
    if args.feature_classes is not None:
        if len(set(args.feature_classes)) != 3:
            raise UsageError(f"--feature-classes needs three distinct classes, got {args.feature_classes}")
        outside = [c for c in args.feature_classes if not 0 <= c < info.num_classes]
        if outside:
            raise UsageError(f"--feature-classes {outside} out of range 0..{info.num_classes - 1} for {args.dataset}")
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    return args
