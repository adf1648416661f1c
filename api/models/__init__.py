"""The request and answer models of the native routes (pydantic): they validate bodies and, through
`model_json_schema()`, make the OpenAPI document (api/openapi.py), so the two cannot drift."""
