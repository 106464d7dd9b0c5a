"""The opt-in prediction cache: `POST /api/predictions` with `"cache": true` (DESIGN "Prediction cache")."""
