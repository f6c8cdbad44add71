"""The web dashboard's server side shared by the cluster dashboard and a plain proxy (docs/web-dashboard.md)."""
