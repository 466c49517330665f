"""Small-scale reproduction of the BD3-LM paper's findings (Arriola et al., ICLR 2025) on the embedded corpus.

    python -m bench.fidelity            # the full study (see README.md for the budget and the results)
    python -m bench.fidelity --quick    # a reduced study in well under a minute (the smoke test runs it)

`study.py` trains the rows and runs the measurements, `measures.py` holds the measurements (validation NELBO, estimator
variance, the L'=1 equivalence, generation against the study's own AR judge), `report.py` writes the tables and plots
beside the paper's numbers.
"""
