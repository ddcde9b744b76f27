"""The app's page scripts (Streamlit runs each as a script; installed as ``lance_app.pages``)."""
