package sqlstore

// Migrations exposes the schema migrations to tests that build a database
// as an earlier release left it.
func Migrations() []string { return migrations }
