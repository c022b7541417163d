fn main() {
    eprintln!("executor: not implemented yet");
    std::process::exit(1);
}
