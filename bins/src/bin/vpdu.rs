fn main() {
    eprintln!("vpdu: not implemented yet");
    std::process::exit(1);
}
