fn main() {
    std::process::exit(qnbd::cli::main());
}
