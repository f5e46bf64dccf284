"""The sinks usage is exported to. `ndjson.py`: CloudEvents lines to a file or stdout
(`build_ndjson`, METER_EXPORT_NDJSON)."""
