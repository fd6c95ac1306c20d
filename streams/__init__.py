"""riskpipe streaming side: Faust app, agents, Kafka and ClickHouse I/O, and the CLI."""
