"""LANCE Lab's Streamlit app: entrypoint (main.py), job runner, figure builders, UI state.

Run it with ``lance app`` (or ``streamlit run lance_app/main.py``). Pages live in ``<repo>/pages``.
``jobs``, ``figures`` and ``catalog`` make no Streamlit calls; ``state`` and ``views`` do.
"""
