"""A deterministic generator of a realistic consumer-loan table with a known risk model.

Each feature is documented in :data:`FEATURES` with its meaning and its true effect on the
log-odds of default. ``driver`` features enter the true risk model; ``context`` features are
realistic loan-file fields with no effect of their own (some correlate with drivers);
``noise`` features are pure random draws, controls that a faithful explanation must rank low.
The same ``(n, seed)`` always gives the same table (numpy ``default_rng``).

The model scores the *standardised* table (:func:`standardise`: each column minus its training
mean over its training std), so zero means "an average applicant" and relevance measures the
deviation from that; reason codes read in standard deviations from the training mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

TARGET = "default"


@dataclass(frozen=True)
class Feature:
    """One column: its role (driver, context, noise), meaning and true effect on risk."""

    name: str
    role: str
    description: str
    effect: str = "none"


_DRIVERS = [
    Feature("fico_score", "driver", "FICO credit score at application (300-850)",
            "strong: each 45 points lower raises the log-odds of default by 0.9"),
    Feature("debt_to_income", "driver", "monthly debt payments over monthly income, percent",
            "strong: +0.8 log-odds per 10 points, steeper above 35%"),
    Feature("revolving_utilization", "driver", "revolving balance over revolving limit, percent",
            "moderate: +0.6 log-odds per 25 points"),
    Feature("annual_income", "driver", "stated annual income, USD",
            "moderate: halving income adds +0.45 log-odds"),
    Feature("loan_amount", "driver", "requested principal, USD",
            "moderate: via the loan-to-income ratio, +0.5 log-odds per 0.15"),
    Feature("interest_rate", "driver", "note rate, percent (priced from score and term)",
            "moderate: +0.35 log-odds per 4 points (pricing residual risk)"),
    Feature("term_60_months", "driver", "1 for a 60-month loan, 0 for 36 months", "+0.45 log-odds"),
    Feature("delinquencies_2y", "driver", "30+ day delinquencies in the past 2 years",
            "+0.35 log-odds per delinquency"),
    Feature("inquiries_6m", "driver", "hard credit inquiries in the past 6 months",
            "+0.2 log-odds per inquiry"),
    Feature("employment_years", "driver", "years with the current employer (0-10, 10 = 10+)",
            "-0.06 log-odds per year"),
    Feature("public_records", "driver", "derogatory public records (bankruptcies, liens)",
            "+0.45 log-odds per record"),
]

_CONTEXT = [
    Feature("total_accounts", "context", "credit lines ever opened"),
    Feature("open_accounts", "context", "credit lines currently open"),
    Feature("mortgage_accounts", "context", "mortgage accounts on file"),
    Feature("bankcard_accounts", "context", "bank card accounts on file"),
    Feature("installment", "context", "monthly installment, USD (follows from amount, rate, term)"),
    Feature("oldest_account_months", "context", "age of the oldest credit line, months"),
    Feature("revolving_balance", "context", "total revolving balance, USD"),
    Feature("total_credit_limit", "context", "total credit limit across lines, USD"),
    Feature("has_co_applicant", "context", "1 when the application has a co-applicant"),
    Feature("application_month", "context", "calendar month of the application (1-12)"),
    Feature("application_weekday", "context", "weekday of the application (0 = Monday)"),
    *[Feature(f"home_ownership_{k}", "context", f"1 when the applicant's home is {k}")
      for k in ("rent", "own", "mortgage")],
    *[Feature(f"purpose_{k}", "context", f"1 when the loan's stated purpose is {k.replace('_', ' ')}")
      for k in ("debt_consolidation", "credit_card", "home_improvement", "major_purchase",
                "medical", "car", "small_business", "other")],
    *[Feature(f"region_{k}", "context", f"1 when the applicant lives in the {k} census region")
      for k in ("northeast", "midwest", "south", "west")],
    *[Feature(f"verification_{k}", "context", f"1 when income verification is '{k.replace('_', ' ')}'")
      for k in ("verified", "source_verified", "not_verified")],
]

N_FEATURES = 78
_NOISE = [
    Feature(f"noise_{i:02d}", "noise", "pure noise: an independent standard normal draw (a control)")
    for i in range(1, N_FEATURES - len(_DRIVERS) - len(_CONTEXT) + 1)
]

FEATURES: list[Feature] = _DRIVERS + _CONTEXT + _NOISE
FEATURE_NAMES: list[str] = [f.name for f in FEATURES]
DRIVERS: list[str] = [f.name for f in _DRIVERS]
# The drivers with the largest true effect: a faithful global importance ranks these on top.
STRONG_DRIVERS: list[str] = ["fico_score", "debt_to_income", "revolving_utilization", "annual_income"]
NOISE: list[str] = [f.name for f in _NOISE]

REASON_TEXT: dict[str, str] = {
    "fico_score": "Credit score",
    "debt_to_income": "Debt-to-income ratio",
    "revolving_utilization": "Proportion of revolving credit in use",
    "annual_income": "Income",
    "loan_amount": "Amount requested relative to income",
    "interest_rate": "Interest rate of the offer",
    "term_60_months": "Length of the loan term",
    "delinquencies_2y": "Recent delinquencies",
    "inquiries_6m": "Number of recent credit inquiries",
    "employment_years": "Length of employment",
    "public_records": "Derogatory public records",
}


def _onehot(rng: np.random.Generator, n: int, names: list[str], p: list[float]) -> dict[str, np.ndarray]:
    k = rng.choice(len(names), size=n, p=p)
    return {name: (k == i).astype(np.float64) for i, name in enumerate(names)}


def generate_loans(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` loan applications with every column of :data:`FEATURES` plus the 0/1 ``default``."""
    rng = np.random.default_rng(seed)
    fico = np.clip(rng.normal(695, 45, n), 300, 850).round()
    income = np.exp(rng.normal(11.05, 0.5, n)).round(-2)
    dti = np.clip(rng.gamma(4.0, 4.5, n), 0, 60).round(1)
    util = np.clip(rng.beta(2.2, 2.8, n) * 100, 0, 100).round(1)
    term60 = (rng.random(n) < 0.3).astype(np.float64)
    amount = np.clip(income * np.clip(rng.normal(0.2, 0.08, n), 0.02, 0.6), 1000, 40000).round(-2)
    rate = np.clip(7 + (720 - fico) * 0.06 + 2.5 * term60 + rng.normal(0, 2.0, n), 5.0, 30.0).round(2)
    delinq = rng.poisson(0.3, n).astype(np.float64)
    inq = rng.poisson(0.8, n).astype(np.float64)
    emp = np.clip(rng.exponential(5.0, n), 0, 10).round()
    pubrec = rng.poisson(0.08, n).astype(np.float64)
    months = 36 + 24 * term60
    r_m = rate / 1200
    installment = (amount * r_m / (1 - (1 + r_m) ** -months)).round(2)
    total_acc = np.clip(rng.normal(24, 10, n), 2, 80).round()
    open_acc = np.clip(np.round(total_acc * rng.uniform(0.25, 0.6, n)), 1, None)
    limit = np.clip(income * rng.uniform(0.2, 0.8, n), 1000, None).round(-2)
    data: dict[str, np.ndarray] = {
        "fico_score": fico, "debt_to_income": dti, "revolving_utilization": util,
        "annual_income": income, "loan_amount": amount, "interest_rate": rate,
        "term_60_months": term60, "delinquencies_2y": delinq, "inquiries_6m": inq,
        "employment_years": emp, "public_records": pubrec,
        "total_accounts": total_acc, "open_accounts": open_acc,
        "mortgage_accounts": rng.poisson(1.2, n).astype(np.float64),
        "bankcard_accounts": rng.poisson(4.0, n).astype(np.float64),
        "installment": installment,
        "oldest_account_months": np.clip(rng.normal(180, 80, n), 6, 600).round(),
        "revolving_balance": (util / 100 * limit * 0.5).round(),
        "total_credit_limit": limit,
        "has_co_applicant": (rng.random(n) < 0.1).astype(np.float64),
        "application_month": rng.integers(1, 13, n).astype(np.float64),
        "application_weekday": rng.integers(0, 7, n).astype(np.float64),
    }
    data.update(_onehot(rng, n, ["home_ownership_rent", "home_ownership_own", "home_ownership_mortgage"],
                        [0.4, 0.1, 0.5]))
    data.update(_onehot(rng, n, [f.name for f in _CONTEXT if f.name.startswith("purpose_")],
                        [0.45, 0.2, 0.08, 0.06, 0.04, 0.05, 0.04, 0.08]))
    data.update(_onehot(rng, n, [f.name for f in _CONTEXT if f.name.startswith("region_")],
                        [0.18, 0.21, 0.38, 0.23]))
    data.update(_onehot(rng, n, [f.name for f in _CONTEXT if f.name.startswith("verification_")],
                        [0.35, 0.35, 0.3]))
    for f in _NOISE:
        data[f.name] = rng.normal(0.0, 1.0, n).round(4)
    logit = (
        -1.75
        - 0.9 * (fico - 695) / 45
        + 0.08 * (dti - 18) + 0.06 * np.maximum(dti - 35, 0)
        + 0.024 * (util - 44)
        - 0.65 * (np.log(income) - 11.05)
        + 3.3 * (amount / income - 0.2)
        + 0.0875 * (rate - 11.5)
        + 0.45 * term60 + 0.35 * delinq + 0.2 * inq - 0.06 * emp + 0.45 * pubrec
    )
    p = 1.0 / (1.0 + np.exp(-logit))
    df = pd.DataFrame({name: data[name] for name in FEATURE_NAMES})
    df[TARGET] = (rng.random(n) < p).astype(np.int64)
    return df


@dataclass
class Standardiser:
    """Column means and stds of the training table (the model's preprocessing)."""

    mean: dict[str, float]
    std: dict[str, float]

    @classmethod
    def fit(cls, df: pd.DataFrame) -> "Standardiser":
        """Fit on the feature columns of ``df``."""
        x = df[FEATURE_NAMES]
        std = x.std(ddof=0).replace(0.0, 1.0)
        return cls(mean={k: float(v) for k, v in x.mean().items()}, std={k: float(v) for k, v in std.items()})

    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        """Standardised features (float32) plus the target column when present."""
        out = pd.DataFrame({c: ((df[c] - self.mean[c]) / self.std[c]).astype(np.float32) for c in FEATURE_NAMES})
        if TARGET in df.columns:
            out[TARGET] = df[TARGET].to_numpy()
        return out


def feature_documentation() -> pd.DataFrame:
    """The data dictionary: name, role, description, true effect."""
    return pd.DataFrame([f.__dict__ for f in FEATURES])
