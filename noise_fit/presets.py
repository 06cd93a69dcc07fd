"""Published device noise models, each with its citation; formulas written from the papers.

`resolve(spec)` turns a CLI argument (a preset name, optionally ``name@scale``, or a path to a
noise.json) into a `NoiseModel`.
"""

from __future__ import annotations

from pathlib import Path

from noise_fit.model import Curve, NoiseModel, NoiseModelError


def pcm_joshi2020(g_max: float = 25.0) -> NoiseModel:
    """PCM statistical model fitted on ~1M IBM PCM devices.

    Nandakumar et al., "Phase-change memory models for deep learning training and inference",
    ICECS 2019; Joshi et al., "Accurate deep neural network inference using computational
    phase-change memory", Nat. Commun. 11, 2473 (2020). Coefficients as published and as used
    in IBM aihwkit's PCMLikeNoiseModel: sigma_prog polynomial in g/g_max (µS at g_max = 25 µS,
    rescaled for other g_max), drift nu mean/std log-linear in g/g_max with clips, 1/f read
    noise Q_s = 0.0088 / (g/g_max)^0.65 capped at 0.2, t0 = 20 s, t_read = 250 ns.
    """
    k = g_max / 25.0
    return NoiseModel(
        name="pcm-joshi2020",
        g_min=0.0,
        g_max=g_max,
        prog_sigma=Curve("poly", (0.26348 * k, 1.9650 * k, -1.1731 * k), lo=0.0),
        nu_mean=Curve("loglin", (0.0244, -0.0155), lo=0.049, hi=0.1),
        nu_std=Curve("loglin", (-0.0059, -0.0125), lo=0.008, hi=0.045),
        t0=20.0,
        read_sigma=Curve("power", (0.0088, -0.65), lo=0.0, hi=0.2),
        read_relative=True,
        read_time_law="log1f",
        t_read=250e-9,
        mapping="differential",
        provenance={
            "source": "publication",
            "citation": "Joshi et al., Nat. Commun. 11, 2473 (2020); Nandakumar et al., ICECS 2019",
        },
    )


def gaussian_relative(sigma: float = 0.1) -> NoiseModel:
    """The common LLM-on-CIM baseline: W + sigma * max|W| * N(0,1) per matrix, nothing else.

    Expressed as a direct (signed) mapping with g_max = 1, so a weight matrix scaled to
    max|W| -> g_max receives programming noise of exactly sigma * max|W|.
    """
    if sigma < 0:
        raise NoiseModelError(f"gaussian sigma must be >= 0, got {sigma}")
    return NoiseModel(
        name=f"gaussian-{sigma:g}",
        g_min=0.0,
        g_max=1.0,
        prog_sigma=Curve("const", (sigma,)),
        mapping="direct",
        provenance={"source": "baseline", "citation": "relative Gaussian weight noise, sigma * max|W|"},
    )


PRESETS = {
    "pcm": pcm_joshi2020,
    "pcm-joshi2020": pcm_joshi2020,
    "gaussian": gaussian_relative,
}


def resolve(spec: str | Path | NoiseModel) -> NoiseModel:
    """A preset name (``pcm``, ``pcm@8`` for 8x programming noise, ``gaussian:0.2``) or a JSON path."""
    if isinstance(spec, NoiseModel):
        return spec
    s = str(spec)
    scale = None
    if "@" in s:
        s, _, sc = s.partition("@")
        try:
            scale = float(sc)
        except ValueError:
            raise NoiseModelError(f"noise spec {spec!r}: scale after '@' must be a number") from None
    name, _, arg = s.partition(":")
    if name in PRESETS:
        try:
            model = PRESETS[name](float(arg)) if arg else PRESETS[name]()
        except ValueError:
            raise NoiseModelError(f"noise spec {spec!r}: argument {arg!r} must be a number") from None
    elif s.endswith(".json") or Path(s).exists():
        model = NoiseModel.from_json(s)
    else:
        raise NoiseModelError(
            f"noise spec {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing .json file")
    return model.scaled(prog=scale) if scale is not None else model
