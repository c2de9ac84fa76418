fn main() { print!("{}", raftkv_operator::crd::crd_yaml()); }
