"""ACLs: policy rules and the authorizer they compile into."""
