"""The result database: ORM tables, engine and migrations, queries."""
