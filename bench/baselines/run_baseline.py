"""Fit one third-party baseline synthesizer on a CSV and sample from it.

Why this file exists: SDV/CTGAN/RDT are under the Business Source License and
smartnoise-synth pins opacus 0.14, so neither may live in fedsynth's own
environment. This CLI runs *inside* bench/.venv-baselines (see setup_venv.sh)
and talks to bench/utility.py only through files: train.csv + columns.json in,
synth.csv + timing.json out.

    python run_baseline.py --method {sdv-ctgan,sdv-tvae,smartnoise-dpctgan,smartnoise-aim}
        --epsilon E|inf --train train.csv --columns columns.json --n N --seed S
        --out synth.csv --timing timing.json [--epochs K] [--delta D] [--bins B]

columns.json: {"columns": [{"name", "type": integer|float|categorical|boolean|datetime,
"categories": [...]?, "min": ..., "max": ..., "nullable": bool}]}; datetime values are ISO
strings. In train.csv and synth.csv an empty cell is a null. "nullable" is the spec's public
declaration; a columns.json without the key (written before it existed) falls back to
"the column has an empty cell in train.csv", which matches the declaration whenever each
nullable column has at least one null.

What each method gets
* sdv-ctgan / sdv-tvae: non-private, --epsilon must be inf. SDV Metadata with
  sdtypes numerical (Int64/Float), categorical, boolean-as-categorical (the CSV
  strings are kept verbatim) and datetime (parsed to datetime64). Default epochs
  are set in DEFAULT_EPOCHS to stay within minutes on 2 cores.
* smartnoise-dpctgan: (epsilon, delta)-DP. When every numeric column declares
  min/max and every categorical one declares its categories, smartnoise's
  TableTransformer is fitted on those *public* declarations only, so
  preprocessor_eps = 0 and the whole epsilon goes to DP-SGD on the
  discriminator (opacus RDP accountant, sigma=5, batch 500). smartnoise checks
  the budget only at the *start* of each epoch, so its last epoch can overshoot
  the target; we therefore pre-compute, with the same accountant (2 DP steps per
  batch: fake and real), the largest epoch count whose *final* epsilon is
  <= target, and train for min(that, --epochs). timing.json records it and the
  final epsilon. (Like smartnoise, this accounts the batches as Poisson sampled
  at rate batch/n, an approximation opacus 0.14 itself warns about.)
  Otherwise 10% of epsilon is given to smartnoise's preprocessor to estimate the
  missing bounds (smartnoise subtracts it from the training budget) and
  categories are read from the data, as smartnoise does by default.
  Booleans are given to smartnoise as the categories "false"/"true" (the CSV
  spellings 1/0, yes/no, t/f are mapped first), so they too are public.
  Note: smartnoise's Discriminator calls torch.manual_seed(0) itself, so the
  torch part of training is identical across --seed values.
* smartnoise-aim: (epsilon, delta)-DP via zCDP. AIM only handles discrete data,
  so numeric/datetime columns are cut into --bins (default 20) equal-width bins
  over the declared [min, max] (smartnoise BinTransformer with fixed bounds,
  no budget); integer columns whose range has <= bins values get one bin per
  value. Samples come back as bin midpoints and are then spread uniformly
  within their bin (pure post-processing), integers floored into range.
  smartnoise's noise comes from OpenDP's RNG, so AIM is not seed-reproducible.
* Nulls (both smartnoise methods). A nullable column gets smartnoise's own
  nullable transformer, prefitted on the public declaration plus None, so
  nulls cost no budget either: categorical/boolean -> LabelTransformer(
  nullable=True), i.e. one extra "null" category (one-hot slot for DP-CTGAN,
  one more AIM value); numeric/datetime -> BinTransformer(nullable=True) for
  AIM (a bin column plus a 0/1 null-flag column, both discrete) and
  MinMaxTransformer(nullable=True) for DP-CTGAN (the scaled value, 0 when
  null, plus a null flag). One gap in smartnoise is patched: its MinMax
  inverse only reads a flag of exactly 1 as null, but DP-CTGAN's generator
  emits the (continuous) flag through tanh, in (-1, 1), so it would never
  produce a null (on loans, 0 of 8000 sampled flags were exactly 1); the flag
  is read as null when > 0.5 (post-processing, no budget).
delta defaults to 1/(n*sqrt(n)) (smartnoise DP-CTGAN's own default) for both DP
methods. All outputs are clipped to declared min/max and written with the
training columns in the same order; nulls from any method are written as empty
cells (nullable integers as pandas Int64).

Threads: OMP/MKL/OpenBLAS default to 1 thread here (override via env). The
networks are tiny, and on a busy 2-core box torch's 2 OpenMP threads spin
against each other: a 128-wide MLP step measured 14x slower than 1 thread.
"""

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # must precede numpy/torch import

import argparse  # noqa: E402
import importlib.metadata as md  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import numpy as np
import pandas as pd

# Chosen so 8000 rows x 4 columns fit in ~2-4 min on 2 busy cores (SDV's own
# default is 300; CTGAN ~1.3 s/epoch, TVAE ~0.5 s/epoch, DP-CTGAN ~7 s/epoch).
# DP-CTGAN's is a cap: at epsilon<=1.5 the budget stops it first (9 epochs at eps 1).
DEFAULT_EPOCHS = {"sdv-ctgan": 150, "sdv-tvae": 300, "smartnoise-dpctgan": 30}
NUMERIC = ("integer", "float", "datetime")
DISCRETE = ("categorical", "boolean")
# Boolean spellings accepted by fedsynth.generative.table (case-insensitive).
TRUE, FALSE = ("true", "t", "yes", "1"), ("false", "f", "no", "0")


def load(train, columns):
    """Read the CSV with declared types (categorical/boolean kept as str, datetimes parsed)."""
    cat = [c["name"] for c in columns if c["type"] in DISCRETE]
    df = pd.read_csv(train, dtype={c: str for c in cat}, keep_default_na=False)
    df = df[[c["name"] for c in columns]]
    for c in columns:
        if c["type"] == "datetime":
            df[c["name"]] = pd.to_datetime(df[c["name"]], format="ISO8601")
        elif c["type"] in ("integer", "float"):
            df[c["name"]] = pd.to_numeric(df[c["name"]]).astype(float)
    return df


def bounds(c):
    """Declared (lo, hi) as floats (epoch seconds for datetimes) or None."""
    if c.get("min") is None or c.get("max") is None:
        return None
    if c["type"] == "datetime":
        return tuple(pd.Timestamp(c[k]).timestamp() for k in ("min", "max"))
    return float(c["min"]), float(c["max"])


def epoch(s):
    """Datetimes to epoch seconds (NaT -> NaN)."""
    return s.map(lambda t: np.nan if pd.isna(t) else t.timestamp()).astype(float)


def nullable(df, columns):
    """{name: nullable} from columns.json; without the key, whether train.csv has a null."""
    out = {}
    for c in columns:
        s = df[c["name"]]
        found = (s == "").any() if c["type"] in DISCRETE else s.isna().any()
        out[c["name"]] = bool(c["nullable"] if "nullable" in c else found)
    return out


def sn_view(df, columns):
    """smartnoise's view of the data: datetimes as epoch seconds, numbers clipped to
    bounds, booleans as "false"/"true", nulls as NaN (numeric) or None (discrete)."""
    df = df.copy()
    for c in columns:
        s = df[c["name"]]
        if c["type"] in DISCRETE:
            if c["type"] == "boolean":
                low = s.str.strip().str.lower()
                s = s.mask(low.isin(TRUE), "true").mask(low.isin(FALSE), "false")
            s = s.astype(object)
            s[s == ""] = None
        else:
            if c["type"] == "datetime":
                s = epoch(s)
            if bounds(c):
                s = s.clip(*bounds(c))  # NaN stays NaN
        df[c["name"]] = s
    return df


def finish(df, columns, date_only):
    """Clip/round numeric columns to the declared schema; datetimes back to ISO; nulls
    (None/NaN/NaT) become empty cells (Int64/NaN/NaT, or "" for discrete columns)."""
    out = pd.DataFrame(index=range(len(df)))
    for c in columns:
        s, b = df[c["name"]].reset_index(drop=True), bounds(c)
        if c["type"] in DISCRETE:
            out[c["name"]] = s.map(lambda v: "" if pd.isna(v) else str(v))
            continue
        if c["type"] == "datetime" and not pd.api.types.is_numeric_dtype(s):
            s = epoch(pd.to_datetime(s))
        s = pd.to_numeric(s).astype(float)
        if b:
            s = s.clip(*b)
        if c["type"] == "integer":
            out[c["name"]] = s.round().astype("Int64")
        elif c["type"] == "datetime":
            t = pd.to_datetime(s, unit="s").dt.round("s")
            out[c["name"]] = t.dt.strftime(
                "%Y-%m-%d" if date_only[c["name"]] else "%Y-%m-%dT%H:%M:%S"
            )
        else:
            out[c["name"]] = s
    return out


def run_sdv(method, df, columns, n, epochs):
    from sdv.metadata import Metadata
    from sdv.single_table import CTGANSynthesizer, TVAESynthesizer

    sd = {
        "integer": {"sdtype": "numerical"},
        "float": {"sdtype": "numerical"},
        "categorical": {"sdtype": "categorical"},
        "boolean": {"sdtype": "categorical"},
        "datetime": {"sdtype": "datetime"},
    }
    meta = Metadata.load_from_dict(
        {"tables": {"train": {"columns": {c["name"]: dict(sd[c["type"]]) for c in columns}}}}
    )
    cls = CTGANSynthesizer if method == "sdv-ctgan" else TVAESynthesizer
    model = cls(meta, epochs=epochs, enable_gpu=False)
    t0 = time.perf_counter()
    v2 = int(md.version("sdv").split(".")[0]) >= 2  # SDV 2 takes/returns {table: df}
    model.fit({"train": df} if v2 else df)
    t1 = time.perf_counter()
    synth = model.sample(num_rows=n)
    synth = synth["train"] if v2 else synth
    sample_s = time.perf_counter() - t1
    return (
        synth,
        t1 - t0,
        sample_s,
        {"epochs": epochs},
        lambda k: model.sample(num_rows=k),
    )


def sn_transformer(columns, nulls, style, bins):
    """smartnoise TableTransformer built from the declared schema.

    nulls: {name: nullable}. Returns (transformer, prefitted). prefitted=True means it
    was fitted on a frame made only of the public declarations (plus None for nullable
    columns), so no budget is spent on it.
    """
    from snsynth.transform import (
        BinTransformer,
        ChainTransformer,
        LabelTransformer,
        MinMaxTransformer,
        OneHotEncoder,
        TableTransformer,
    )

    class FlagMinMax(MinMaxTransformer):
        """MinMaxTransformer(nullable=True) that reads a null flag > 0.5 as null
        (smartnoise's needs exactly 1, which DP-CTGAN's tanh output never gives)."""

        def _inverse_transform(self, val):
            v, flag = val
            return None if flag > 0.5 else super()._inverse_transform((v, 0))

    ts, public, ok = [], {}, True
    for c in columns:
        b, nl = bounds(c), nulls[c["name"]]
        if c["type"] in DISCRETE:
            lab = LabelTransformer(nullable=nl)
            ts.append(ChainTransformer([lab, OneHotEncoder()]) if style == "gan" else lab)
            if c["type"] == "boolean":
                vals = ["false", "true"]
            else:
                vals = [str(v) for v in c.get("categories") or []]
            ok &= bool(vals)
        else:
            lo, hi = b if b else (None, None)
            if style == "gan":
                ts.append(
                    (FlagMinMax if nl else MinMaxTransformer)(lower=lo, upper=hi, nullable=nl)
                )
            elif b and c["type"] == "integer" and hi - lo + 1 <= bins:
                ts.append(
                    BinTransformer(bins=int(hi - lo + 1), lower=lo, upper=hi + 1, nullable=nl)
                )
            else:
                ts.append(
                    BinTransformer(
                        bins=bins,
                        lower=lo,
                        upper=(hi + 1 if c["type"] == "integer" and b else hi),
                        nullable=nl,
                    )
                )
            vals = list(b) if b else []
            ok &= b is not None
        public[c["name"]] = vals + [None] if nl else vals
    tt = TableTransformer(ts)
    if ok:
        m = max(len(v) for v in public.values())
        tt.fit(pd.DataFrame({k: [v[i % len(v)] for i in range(m)] for k, v in public.items()}))
    return tt, ok


def dpctgan_budget(model, n, cap, target):
    """(largest epochs <= cap whose final epsilon fits the target, that epsilon)."""
    from opacus import privacy_analysis as pa

    alphas = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # = smartnoise's
    q, per_epoch = model._batch_size / n, 2 * max(n // model._batch_size, 1)

    def eps(e):
        return pa.get_privacy_spent(
            alphas, pa.compute_rdp(q, model.sigma, per_epoch * e, alphas), model.delta
        )[0]

    best = (0, 0.0)
    for e in range(1, cap + 1):
        if (spent := float(eps(e))) > target:
            break
        best = (e, spent)
    return best


def run_smartnoise(method, df, columns, n, epochs, epsilon, delta, bins, seed):
    import snsynth  # noqa: F401  (import before the clock: jax/opacus import is slow)
    from snsynth.aim import AIMSynthesizer
    from snsynth.pytorch.nn.dpctgan import DPCTGAN

    data = sn_view(df, columns)
    nulls = nullable(df, columns)
    style = "gan" if method == "smartnoise-dpctgan" else "cube"
    tt, prefit = sn_transformer(columns, nulls, style, bins)
    pre_eps = 0.0 if (prefit or not tt.needs_epsilon) else 0.1 * epsilon
    if method == "smartnoise-dpctgan":
        model = DPCTGAN(epsilon=epsilon, delta=delta, epochs=epochs, verbose=False, cuda=False)
        cap, (epochs, eps_final) = (
            epochs,
            dpctgan_budget(model, len(data), epochs, epsilon - pre_eps),
        )
        if epochs == 0:
            raise SystemExit(f"epsilon={epsilon} is too small for even one DP-CTGAN epoch")
        model._epochs = epochs
    else:
        model = AIMSynthesizer(epsilon=epsilon, delta=delta)
    t0 = time.perf_counter()
    model.fit(data, transformer=tt, preprocessor_eps=pre_eps)
    t1 = time.perf_counter()
    synth = model.sample(n)
    if method == "smartnoise-aim":  # spread bin midpoints uniformly within their bin (NaN: null)
        rng = np.random.default_rng(seed)
        for c, t in zip(columns, tt.transformers, strict=True):
            if c["type"] in NUMERIC:
                w = (t.fit_upper - t.fit_lower) / t.bins
                v = synth[c["name"]].astype(float) + rng.uniform(-w / 2, w / 2, len(synth))
                synth[c["name"]] = np.floor(v) if c["type"] == "integer" else v
    sample_s = time.perf_counter() - t1
    info = {
        "preprocessor_eps": pre_eps,
        "schema_prefit_public": prefit,
        "delta": delta,
        "nullable_columns": [k for k, v in nulls.items() if v],
    }
    if method == "smartnoise-dpctgan":
        info.update(
            epochs_cap=cap,
            epochs=epochs,
            epochs_trained=len(model.epsilon_list),
            epsilon_spent=eps_final,
            sigma=model.sigma,
            batch_size=model._batch_size,
        )
    else:
        info.update(bins=bins, rho=float(model.rho))
    return synth, t1 - t0, sample_s, info, model.sample


def versions():
    out = {}
    for p in (
        "torch",
        "numpy",
        "pandas",
        "sdv",
        "ctgan",
        "rdt",
        "smartnoise-synth",
        "smartnoise-sql",
        "opacus",
        "mbi",
        "jax",
        "opendp",
    ):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--method",
        required=True,
        choices=["sdv-ctgan", "sdv-tvae", "smartnoise-dpctgan", "smartnoise-aim"],
    )
    ap.add_argument("--epsilon", required=True, type=float, help="a number, or inf")
    ap.add_argument("--delta", type=float, default=None, help="default 1/(n*sqrt(n))")
    ap.add_argument("--train", required=True)
    ap.add_argument("--columns", required=True)
    ap.add_argument("--n", required=True, type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--timing", required=True)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--bins", type=int, default=20, help="AIM bins per numeric column")
    ap.add_argument(
        "--speed-rows",
        type=int,
        default=0,
        help="also time one sample of this many rows with 2 torch threads (the figure "
        "bench/utility.py compares; the first sample above serves as warm-up)",
    )
    a = ap.parse_args()

    with open(a.columns) as f:
        columns = json.load(f)["columns"]
    df = load(a.train, columns)
    date_only = {
        c["name"]: bool(
            (df[c["name"]] == df[c["name"]].dt.normalize())[df[c["name"]].notna()].all()
        )
        for c in columns
        if c["type"] == "datetime"
    }
    random.seed(a.seed)
    np.random.seed(a.seed)
    import torch

    torch.manual_seed(a.seed)
    epochs = a.epochs or DEFAULT_EPOCHS.get(a.method)

    if a.method.startswith("sdv-"):
        if not math.isinf(a.epsilon):
            ap.error("SDV methods are not differentially private: use --epsilon inf")
        synth, fit_s, sample_s, info, resample = run_sdv(a.method, df, columns, a.n, epochs)
    else:
        if not (0 < a.epsilon < math.inf):
            ap.error("smartnoise methods need a finite epsilon > 0")
        delta = a.delta if a.delta is not None else 1.0 / (len(df) * math.sqrt(len(df)))
        synth, fit_s, sample_s, info, resample = run_smartnoise(
            a.method, df, columns, a.n, epochs, a.epsilon, delta, a.bins, a.seed
        )

    if a.speed_rows:
        torch.set_num_threads(2)
        t = time.perf_counter()
        resample(a.speed_rows)
        info["speed_rows"] = a.speed_rows
        info["speed_rows_per_s"] = a.speed_rows / (time.perf_counter() - t)
    finish(synth, columns, date_only).to_csv(a.out, index=False)
    timing = {
        "fit_s": fit_s,
        "sample_s": sample_s,
        "sample_rows_per_s": a.n / sample_s if sample_s > 0 else None,
        "method": a.method,
        "epsilon": "inf" if math.isinf(a.epsilon) else a.epsilon,
        "seed": a.seed,
        "n": a.n,
        "train_rows": len(df),
        "threads": torch.get_num_threads(),
        "library_versions": versions(),
        **info,
    }
    with open(a.timing, "w") as f:
        json.dump(timing, f, indent=2)
    print(json.dumps({k: timing[k] for k in ("method", "fit_s", "sample_s", "sample_rows_per_s")}))


if __name__ == "__main__":
    main()
