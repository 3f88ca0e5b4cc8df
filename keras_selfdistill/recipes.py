"""Published methods as ready-made terms, step for step as their code."""

from keras_selfdistill import _arguments
from keras_selfdistill import schedules
from keras_selfdistill._arguments import check_positive_int
from keras_selfdistill.teachers.ema import EMA
from keras_selfdistill.teachers.past_predictions import PastPredictions
from keras_selfdistill.terms.consistency import Consistency
from keras_selfdistill.terms.distillation import Distillation
from keras_selfdistill.terms.sequence_kd import SequenceKD


def ps_kd(num_samples, num_classes, epochs, alpha=0.8, dtype="float16"):
    """Progressive self-knowledge distillation (PS-KD), as published.

    Each sample's target in the 0-based epoch `t` of `epochs` is
    `(1 − α_t)·y + α_t·p_prev`, where `p_prev` is the student's prediction
    for that sample in the previous epoch and `α_t = alpha·(t + 1)/epochs`,
    which reaches `alpha` in the last epoch; in the first epoch the target
    is the label itself, at full weight. This is the official code's
    schedule (lgcnsai/PS-KD-Pytorch, `main.py`: `alpha_t = alpha_T *
    ((epoch + 1) / end_epoch)`, and `all_predictions` set to the one-hot
    labels in epoch 0). The returned term is
    `Distillation(PastPredictions(...), xi=α_t)`: cross-entropy against the
    mixed target equals `(1 − α_t)·CE(y) + α_t·KL(p_prev ‖ p)` plus a
    constant, so the gradients are PS-KD's exactly.

    The schedule counts the distiller's epochs, which go on across `fit`
    calls; train with `fit(..., epochs=epochs)` once, or in several calls
    that add up to `epochs`.

    Reference:

    - [Kim et al., 2021](https://arxiv.org/abs/2006.12000) (PS-KD)

    Args:
        num_samples: Number of training samples (ids run from 0).
        num_classes: Number of classes of the student's outputs.
        epochs: The planned number of training epochs `T`.
        alpha: The final weight `α_T` of the past predictions. Defaults to
            `0.8` (the paper's).
        dtype: Storage dtype of the prediction bank. Defaults to
            `"float16"`.

    Returns:
        A `keras_selfdistill.terms.Distillation` term named `"ps_kd"`.

    Example:

    ```python
    ksd = keras_selfdistill
    distiller = ksd.Distiller(
        student, [ksd.recipes.ps_kd(len(x_train), 10, epochs=300)])
    distiller.compile(optimizer="sgd", loss=keras.losses
                      .SparseCategoricalCrossentropy(from_logits=True))
    distiller.fit(ksd.data.with_sample_ids(x_train), y_train, epochs=300)
    ```
    """
    check_positive_int("ps_kd", "epochs", epochs)
    if not _arguments.is_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(
            "ps_kd `alpha` is the final weight of the past predictions and "
            f"must be in [0, 1] (the paper uses 0.8). Received: alpha={alpha!r}"
        )
    if epochs == 1:
        xi = float(alpha)
    else:
        # Linear from α/T in epoch 0 to α in epoch T − 1: α·(t + 1)/T.
        xi = schedules.LinearRampUp(
            ramp_up_epochs=epochs - 1, start=alpha / epochs, end=alpha
        )
    teacher = PastPredictions(num_samples, num_classes, dtype=dtype)
    return Distillation(teacher, xi=xi, name="ps_kd")


def dkd(teacher, alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=20):
    """Decoupled knowledge distillation (DKD), as published.

    The term adds `w_t · T² · (α · TCKD + β · NCKD)` to the supervised loss,
    with the warm-up `w_t = min((t + 1) / warmup_epochs, 1)` in the 0-based
    epoch `t`: the official code's `min(epoch / warmup, 1)`, whose epochs
    count from 1 (megvii-research/mdistiller, `distillers/DKD.py` and
    `engine/trainer.py`). The defaults are its CIFAR-100 configuration
    (`engine/cfg.py`: α = 1, β = 8, T = 4, 20 warm-up epochs,
    cross-entropy weight 1); for ImageNet it uses α = 0.5, β = 0.5, T = 1.

    The returned term is `Distillation(teacher, loss="dkd", weight=α·w_t,
    beta=β/α)`, the same objective. Its epochs are the distiller's, which go
    on across `fit` calls.

    Reference:

    - [Zhao et al., 2022](https://arxiv.org/abs/2203.08679) (DKD)

    Args:
        teacher: A `keras.Model` (used frozen) or a
            `keras_selfdistill.teachers.Teacher`.
        alpha: Weight `α > 0` of TCKD. Defaults to `1.0`.
        beta: Weight `β >= 0` of NCKD. Defaults to `8.0`.
        temperature: Positive temperature `T`. Defaults to `4.0`.
        warmup_epochs: Epochs `W` until the full weight. Defaults to `20`.

    Returns:
        A `keras_selfdistill.terms.Distillation` term named `"dkd"`.

    Example:

    ```python
    ksd = keras_selfdistill
    distiller = ksd.Distiller(student, [ksd.recipes.dkd(teacher)])
    distiller.compile(optimizer="sgd", loss=keras.losses
                      .SparseCategoricalCrossentropy(from_logits=True))
    distiller.fit(x_train, y_train, epochs=240)
    ```
    """
    check_positive_int("dkd", "warmup_epochs", warmup_epochs)
    if not _arguments.is_number(alpha) or not alpha > 0.0:
        raise ValueError(
            "dkd `alpha` weighs TCKD and must be a number > 0 (the paper "
            f"uses 1.0 on CIFAR-100). Received: alpha={alpha!r}"
        )
    if not _arguments.is_number(beta) or beta < 0.0:
        raise ValueError(
            "dkd `beta` weighs NCKD and must be a number >= 0 (the paper "
            f"uses 8.0 on CIFAR-100). Received: beta={beta!r}"
        )
    weight = float(alpha)
    if warmup_epochs > 1:
        # α·(t + 1)/W from epoch 0, reaching α in epoch W − 1.
        weight = schedules.LinearRampUp(
            ramp_up_epochs=warmup_epochs - 1,
            start=alpha / warmup_epochs,
            end=alpha,
        )
    return Distillation(
        teacher,
        loss="dkd",
        temperature=temperature,
        weight=weight,
        beta=beta / alpha,
        name="dkd",
    )


def mean_teacher(augment, consistency=100.0, ramp_up_epochs=5, ema_decay=0.97):
    """The mean teacher (Tarvainen & Valpola, 2017), as published.

    An exponential moving average of the student (`EMA(ema_decay,
    warmup=True)`: the true average of the weights seen until the moving
    one is better, `min(1 − 1/(t + 1), decay)` at the `t`-th update) sees
    the batch as the pipeline gives it; the student sees `augment(x)`; the
    consistency cost is the squared difference of their softmax outputs,
    summed over classes and divided by their number (`Consistency(...,
    loss="mse")`), weighted by `consistency · exp(−5 (1 − t/R)²)` in the
    0-based epoch `t < R` and by `consistency` after. These are the
    official code's `update_ema_variables`, `softmax_mse_loss` and
    `sigmoid_rampup` of the integer epoch (CuriousAI/mean-teacher,
    `pytorch/main.py`), and the defaults its CIFAR-10 configuration
    (`experiments/cifar10_test.py`: consistency 100, ramp-up 5 epochs,
    EMA decay 0.97). Unlabelled samples carry the compiled loss's
    `ignore_class` and learn from the consistency alone, as in
    `Consistency`.

    Where this differs from the official code: one head (its ShakeShake
    runs add a second head and a logit-distance cost), the teacher in
    inference mode with averaged BatchNorm statistics (the official
    teacher runs in training mode), and one augmented view for the
    student beside the pipeline's for the teacher (the official code
    draws two independent views of the same augmentation).

    Reference:

    - [Tarvainen & Valpola, 2017](https://arxiv.org/abs/1703.01780)

    Args:
        augment: The student's view: a Keras layer (or `keras.Sequential`
            of them), as `Consistency` takes it.
        consistency: The cost's weight after the ramp-up. Defaults to
            `100.0`.
        ramp_up_epochs: Epochs `R` of the sigmoid ramp-up. Defaults to `5`.
        ema_decay: The moving average's decay. Defaults to `0.97`.

    Returns:
        A `keras_selfdistill.terms.Consistency` term named
        `"mean_teacher"`.

    Example:

    ```python
    ksd = keras_selfdistill
    noise = keras.Sequential([keras.layers.RandomTranslation(0.06, 0.06),
                              keras.layers.GaussianNoise(0.15)])
    distiller = ksd.Distiller(student, [ksd.recipes.mean_teacher(noise)])
    distiller.compile("adam", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=-1))
    distiller.fit(x, y_with_minus_one_unlabelled, epochs=30)
    ```
    """
    check_positive_int("mean_teacher", "ramp_up_epochs", ramp_up_epochs)
    if not _arguments.is_number(consistency) or consistency < 0.0:
        raise ValueError(
            "mean_teacher `consistency` weighs the consistency cost and "
            "must be a number >= 0 (the paper uses 100.0 on CIFAR-10). "
            f"Received: consistency={consistency!r}"
        )
    weight = schedules.SigmoidRampUp(
        ramp_up_epochs=ramp_up_epochs,
        end=float(consistency),
        zero_at_start=False,
    )
    return Consistency(
        augment,
        teacher=EMA(momentum=ema_decay, warmup=True),
        loss="mse",
        weight=weight,
        name="mean_teacher",
    )


def self_data(
    original, prompt_length, max_new_tokens=None, stop_token_ids=None
):
    """Self-data distillation: a pruned LM fine-tuned on the original's text.

    Recovers a pruned (or otherwise compressed) language model by
    fine-tuning it with cross-entropy on what the *original*, unpruned
    model writes, not on the dataset's own continuations: the data stays
    in the distribution the original learned, which Thangarasa et al.
    found to forget less than fine-tuning on the dataset (SFT). Each
    sequence keeps its first `prompt_length` tokens and the original
    continues it greedily; the labels are its tokens
    (`keras_selfdistill.terms.SequenceKD` with `fraction=1.0` and
    `temperature=0.0`, named `"self_data"`). Compile the distiller with
    the cross-entropy: it is the method's whole loss.

    Differences from the paper, which distils instruction data: there the
    original rewrites each response given the instruction and the
    dataset's response, in a prompt template, and a rewritten response
    whose final answer differs from the dataset's is replaced by the
    dataset's. Plain text has neither a response to rewrite nor an answer
    to check, so here the original continues the prompt itself. Greedy
    decoding of a frozen model writes the same text every epoch, so the
    sequences equal a dataset generated once, as in the paper; they are
    generated at every step instead (with KerasHub's key/value cache for a
    `CausalLM` original).

    Reference:

    - [Thangarasa et al., 2024](https://arxiv.org/abs/2410.09982)
      (Self-data distillation for recovering quality in pruned LLMs)

    Args:
        original: The unpruned `keras.Model` (used frozen), from token ids
            to next-token logits.
        prompt_length: Number of leading tokens of each sequence kept as
            the prompt, at least 1.
        max_new_tokens: Most tokens the original writes per sequence, or
            `None` for up to the end of the sequences.
        stop_token_ids: Token ids that end a written sequence, or `None`.

    Returns:
        A `keras_selfdistill.terms.SequenceKD` term named `"self_data"`.

    Example:

    ```python
    ksd = keras_selfdistill
    # pruned_lm: original_lm with fewer layers (`ksd.pruning.prune_backbone`)
    distiller = ksd.Distiller(
        pruned_lm, [ksd.recipes.self_data(original_lm, prompt_length=32)])
    distiller.compile(optimizer="adam", loss=keras.losses
                      .SparseCategoricalCrossentropy(from_logits=True))
    distiller.fit(windows, next_tokens, epochs=1)
    ```
    """
    return SequenceKD(
        original,
        prompt_length,
        fraction=1.0,
        temperature=0.0,
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop_token_ids,
        name="self_data",
    )
