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


def pcm_hermes2023(num_devices: int = 2, g_max: float | None = None) -> NoiseModel:
    """PCM on the IBM HERMES 64-core chip (14 nm CMOS, backend-integrated PCM).

    Le Gallo et al., "A 64-core mixed-signal in-memory compute chip based on phase-change
    memory for deep neural network inference", Nat. Electron. 6, 680-693 (2023);
    Khaddam-Aljameh et al., JSSC 57, 1027 (2022); method of Nandakumar et al., ICECS 2019.
    Coefficients as characterised on the chip and published in IBM aihwkit's HermesNoiseModel:
    sigma_prog cubic in g/g_max (µS at the characterised g_max: 20.7 µS for 2 devices per
    weight, 10.35 µS for 1), drift nu mean/std and 1/f read noise Q_s as piecewise
    (log below a break, polynomial above) functions of g/g_max, t0 = 300 s (2 devices) or
    200 s (1 device), t_read = 512 ns. With 2 devices the model treats both devices as holding
    the same conductance (the published MSF programming; no dynamic remapping).
    """
    if num_devices not in (1, 2):
        raise NoiseModelError(f"HERMES supports 1 or 2 devices per weight, got {num_devices}")
    num_devices = int(num_devices)
    g_ref = 20.7 if num_devices == 2 else 10.35
    g_max = g_ref if g_max is None else float(g_max)
    if not 0 < g_max <= g_ref:
        raise NoiseModelError(f"HERMES g_max must be in (0, {g_ref}] µS (characterised range), got {g_max}")
    k = g_max / g_ref
    if num_devices == 2:
        prog = (0.16603222, 4.71806468, -8.48101252, 4.68961419)
        nu_std = Curve("split", (0.3055, -0.0057, -0.0117, 0.0091, 0.04, 0.0073, 0.0093, -0.0118), lo=0.0)
        q_s = Curve("split", (0.16, -0.0069, -0.0117, 0.015, 0.04, 0.0123, 0.0211, -0.0280, 0.0069), lo=0.0)
        t0 = 300.0
    else:
        prog = (0.15781817, 2.32443916, -2.16310839, 0.68841818)
        nu_std = Curve("split", (0.3039, -0.0023, -0.0120, 0.0124, 0.04, 0.0104, 0.0116, -0.0165), lo=0.0)
        q_s = Curve("split", (0.1591, 0.0038, -0.0078, 0.0179, 0.04, 0.0088, 0.0768, -0.1352, 0.0664), lo=0.0)
        t0 = 200.0
    return NoiseModel(
        name=f"pcm-hermes2023-{num_devices}dev",
        g_min=0.0,
        g_max=g_max,
        prog_sigma=Curve("poly", tuple(c * k for c in prog), lo=0.0),
        nu_mean=Curve("split", (0.0945, -0.0182, -0.0387, 0.0720, 0.13, 0.0736, -0.0126, -0.0436), lo=0.0),
        nu_std=nu_std,
        t0=t0,
        read_sigma=q_s,
        read_relative=True,
        read_time_law="log1f",
        t_read=512e-9,
        mapping="differential",
        provenance={
            "source": "publication",
            "citation": "Le Gallo et al., Nat. Electron. 6, 680 (2023); Khaddam-Aljameh et al., JSSC 57, 1027 "
                        "(2022); coefficients as in IBM aihwkit HermesNoiseModel",
            "num_devices": num_devices,
        },
    )


# Wan et al. (2022) deviation-from-target sigma, µS at g_max = 40 µS, ascending powers of g/g_max,
# 4th-order fits to the published figure at 1 s, 1 day and 2 days after programming.
_WAN2022_POLY: dict[float, tuple[float, ...]] = {
    1.0: (0.348, 16.030, -43.853, 45.393, -16.815),
    86400.0: (0.701, 22.086, -50.773, 47.095, -16.458),
    172800.0: (0.782, 20.274, -43.507, 37.062, -11.934),
}


def rram_wan2022(t_eval: float = 1.0, g_max: float = 40.0) -> NoiseModel:
    """RRAM of the NeuRRAM chip: total conductance deviation from target at time t_eval.

    Wan et al., "A compute-in-memory chip based on resistive random-access memory",
    Nature 608, 504-512 (2022). 4th-order polynomial fits (µS at g_max = 40 µS) of the
    deviation sigma versus g/g_max at 1 s, 1 day and 2 days after programming, as estimated
    from the published figures in IBM aihwkit's ReRamWan2022NoiseModel. RRAM relaxation is
    not a power-law drift, so there is no nu: the preset puts the whole deviation at the chosen
    time into prog_sigma (t_eval must be one of 1, 86400, 172800 s). No separate read noise
    was published (aihwkit suggests ~1 % additive short-term noise on top, not included).
    """
    key = float(t_eval)
    if key not in _WAN2022_POLY:
        raise NoiseModelError(f"rram-wan2022 t_eval must be one of {sorted(_WAN2022_POLY)} s, got {t_eval}")
    if not g_max > 0:
        raise NoiseModelError(f"rram-wan2022 g_max must be > 0 µS, got {g_max}")
    k = g_max / 40.0
    return NoiseModel(
        name=f"rram-wan2022-t{key:g}",
        g_min=0.0,
        g_max=g_max,
        prog_sigma=Curve("poly", tuple(c * k for c in _WAN2022_POLY[key]), lo=0.0),
        mapping="differential",
        provenance={
            "source": "publication",
            "citation": "Wan et al., Nature 608, 504 (2022) (NeuRRAM); polynomial fits as in IBM aihwkit "
                        "ReRamWan2022NoiseModel",
            "t_eval_s": key,
        },
    )


PRESETS = {
    "pcm": pcm_joshi2020,
    "pcm-joshi2020": pcm_joshi2020,
    "gaussian": gaussian_relative,
    "hermes": pcm_hermes2023,
    "pcm-hermes2023": pcm_hermes2023,
    "rram": rram_wan2022,
    "rram-wan2022": rram_wan2022,
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
