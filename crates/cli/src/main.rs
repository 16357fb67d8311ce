//! `leasehold`: one binary for the broker, the agent, the all-in-one `up`,
//! and the verbs of lenders, borrowers and admins.
//!
//! Exit codes: 0 success; 1 failure (an error from a service, or the
//! network); 2 bad usage; 3 nothing matched (`find`, `lease --best`);
//! 4 conflict (the partition is taken or locked); `run` exits with the job's
//! own exit code (124 when it timed out, like `timeout(1)`).

mod direct;
mod images;
mod logging;
mod man;
mod progress;
mod reservations;
mod rights;
mod serve;
mod simulate;
mod verbs;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "leasehold",
    version,
    about = "A capacity exchange for partitioned servers: lend idle partitions, lease them, run jobs, pay by the second.",
    long_about = "A capacity exchange for partitioned servers.\n\nStart everything on this machine with `leasehold up`, then use the printed tokens with `find`, `lease`, `run`, `release` and `bill`.\nEvery verb talks to the broker at --broker (or LEASEHOLD_BROKER) with the token from --token-file FILE (or LEASEHOLD_TOKEN; never on the command line); `--output json` prints one JSON document for scripts.\n\nExit codes: 0 success, 1 failure, 2 bad usage, 3 nothing matched, 4 conflict (taken or locked); `run` exits with the job's exit code (124 on timeout)."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub struct Global {
    /// The broker's URL; several brokers of one database (an active one and
    /// standbys) as URL,URL,...: requests go to whichever is active.
    /// `leasehold agent` takes it once per market it lends to, as
    /// URL[=SHARE]: with SHARE (`vcpus=N,memory_mib=M,disk_gib=D`, and
    /// optionally `price_per_vcpu_hour_micros=P`,
    /// `price_per_memory_gib_hour_micros=P`,
    /// `price_per_disk_gib_hour_micros=P`, `images=a+b`) that broker carves
    /// partitions of each borrower's size out of the share; without, it
    /// manages the agent's fixed partitions (one broker at most). Give each
    /// broker's lender token as --token-file URL=FILE.
    #[arg(
        long = "broker",
        global = true,
        env = "LEASEHOLD_BROKER",
        default_value = "http://127.0.0.1:7070",
        value_parser = parse_broker_arg,
        action = clap::ArgAction::Append,
        value_name = "URL[,URL][=SHARE]"
    )]
    pub broker_args: Vec<(String, Option<String>)>,
    /// The one broker of every command but `agent`: the first --broker.
    #[arg(skip)]
    pub broker: String,
    /// Refused: a token on the command line is readable by every local
    /// user in /proc/PID/cmdline. Use --token-file or LEASEHOLD_TOKEN.
    #[arg(long = "token", global = true, hide = true, value_name = "VALUE")]
    pub token_on_command_line: Option<String>,
    /// A file holding your token (as printed by `leasehold up` or
    /// `leasehold principal add`); refused when group or others can read it.
    /// Or set LEASEHOLD_TOKEN in the environment.
    /// `leasehold agent` lending to several brokers takes one per broker,
    /// as URL=FILE.
    #[arg(long = "token-file", global = true, env = "LEASEHOLD_TOKEN_FILE",
          action = clap::ArgAction::Append, value_name = "[URL=]FILE")]
    pub token_file_args: Vec<String>,
    /// The plain --token-file FILE.
    #[arg(skip)]
    pub token_file: Option<PathBuf>,
    /// The --token-file URL=FILE pairs, URL normalised as --broker's.
    #[arg(skip)]
    pub market_token_files: Vec<(String, PathBuf)>,
    /// The token, from --token-file or LEASEHOLD_TOKEN (never the command line).
    #[arg(skip)]
    pub token: Option<String>,
    /// The certificate (PEM) of the CA that signs the servers' TLS
    /// certificates, such as the `ca_cert` that `leasehold up` prints: only
    /// certificates it signed are accepted on https:// (pinning). Without
    /// it, https:// URLs are checked against the public CAs built in
    /// (Mozilla's list), for servers with real certificates.
    #[arg(long, global = true, env = "LEASEHOLD_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// What --ca-cert makes of server certificates.
    #[arg(skip)]
    pub server_trust: leasehold_api::ServerTrust,
    /// `text` for people, `json` for scripts (one JSON document on stdout).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DriverChoice {
    /// `oci` where runc, cgroups and loop devices are usable (as root);
    /// otherwise refuses to start and says why. Never falls back to the
    /// unisolated `process` driver.
    Auto,
    /// Isolated OCI containers run by runc, with enforced CPU, memory, disk
    /// and process limits, booting images from an image store.
    Oci,
    /// UNISOLATED: real child processes with rlimits, which can read the
    /// host's files (development, trusted lending). Its partitions are
    /// marked unisolated, and borrowers get them only by asking.
    Process,
    /// Simulated partitions and jobs in memory (simulations, benchmarks).
    Sim,
    /// QEMU virtual machines: each job boots the partition's own OS kernel
    /// (an image from `leasehold images build debian-vm`), with the QEMU
    /// process held to the partition's CPU and memory limits. KVM where
    /// /dev/kvm really works, TCG otherwise.
    Vm,
}

#[derive(Subcommand)]
enum Command {
    /// Start a broker and a local agent lending part of this machine (all in one).
    Up(serve::UpArgs),
    /// Run a broker.
    Broker(serve::BrokerArgs),
    /// Run an agent on this host, registered with a broker.
    Agent(serve::AgentArgs),
    /// The image store: build, add, list and serve partition images.
    #[command(subcommand)]
    Images(images::ImagesCommand),
    /// Admin: manage principals (lenders, borrowers, admins).
    #[command(subcommand)]
    Principal(verbs::PrincipalCommand),
    /// Show who your token belongs to.
    Whoami,
    /// Lender: manage this host's lendable partitions (talks to the agent).
    #[command(subcommand)]
    Host(verbs::HostCommand),
    /// Borrower: list free partitions that meet your requirements.
    Find(verbs::FindArgs),
    /// Borrower: lease a partition (by name, or the best match with --best).
    Lease(verbs::LeaseArgs),
    /// Borrower: run a job on a leased partition and show its output.
    Run(verbs::RunArgs),
    /// Borrower: release a lease; it is billed up to now.
    Release(verbs::ReleaseArgs),
    /// List your leases (borrowers: borrowed; lenders: lent; admins: all).
    Leases,
    /// Show your leases, charges and balance.
    Bill,
    /// Show ledger transfers and balances (admins: the whole ledger).
    Ledger,
    /// Workloads: capacity guaranteed by a start time (apply, list, show, delete).
    #[command(subcommand)]
    Workload(reservations::WorkloadCommand),
    /// Acquisition pools gathering capacity for instances, and their links.
    #[command(subcommand)]
    Pool(reservations::PoolCommand),
    /// Instances whose capacity will not be guaranteed by their start, and what would fix it.
    Warnings,
    /// Admin: reservation planning.
    #[command(subcommand)]
    Plan(reservations::PlanCommand),
    /// One instance of a workload: migrate it to another host, or delete it.
    #[command(subcommand)]
    Instance(reservations::InstanceCommand),
    /// Admin: power saving (drain the least-used host; power one up).
    #[command(subcommand)]
    Power(reservations::PowerCommand),
    /// Usage rights of a share group (seed 004), from the agent managing them.
    #[command(subcommand)]
    Rights(rights::RightsCommand),
    /// The share group of usage rights (seed 004): its hosts, primary
    /// manager and transfers.
    #[command(subcommand)]
    Group(rights::GroupCommand),
    /// Run a reservation scenario file through the planner on a simulated
    /// clock, printing the pools, hosts and warnings at each step.
    Simulate(simulate::SimulateArgs),
    /// Print a shell completion script: `source <(leasehold completions
    /// bash)`, or save it where your shell loads completions from.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff: `leasehold man | man -l -`), or write one
    /// page per command with --dir.
    Man(man::ManArgs),
}

/// An http(s) URL, so a mistyped one fails here with a clear message
/// instead of deep inside the HTTP client.
pub fn parse_url(text: &str) -> Result<String, String> {
    let ok = (text.starts_with("http://") || text.starts_with("https://"))
        && text.len() > "https://".len()
        && !text.chars().any(char::is_whitespace);
    if ok {
        Ok(text.trim_end_matches('/').to_string())
    } else {
        Err(format!("'{text}' is not a URL like http://127.0.0.1:7070"))
    }
}

/// `URL[,URL][=SHARE]`: the broker's URLs and, for `agent`, the share
/// it gets (parsed by the agent: `vcpus=N,memory_mib=M,disk_gib=D`).
pub fn parse_broker_arg(text: &str) -> Result<(String, Option<String>), String> {
    match text.split_once('=') {
        Some((urls, share)) => Ok((parse_broker_urls(urls)?, Some(share.to_string()))),
        None => Ok((parse_broker_urls(text)?, None)),
    }
}

/// Splits the --broker and --token-file occurrences: every command but
/// `agent` takes one broker (without a share) and one plain token file.
fn resolve_brokers(global: &mut Global) -> Result<(), String> {
    let Some((first, _)) = global.broker_args.first() else {
        return Err("--broker: no broker URL".into());
    };
    global.broker = first.clone();
    for entry in &global.token_file_args {
        let pair = entry
            .split_once('=')
            .filter(|(url, _)| url.starts_with("http://") || url.starts_with("https://"));
        match pair {
            Some((url, file)) => global
                .market_token_files
                .push((parse_broker_urls(url)?, PathBuf::from(file))),
            None if global.token_file.is_some() => {
                return Err(
                    "--token-file FILE given twice; give one per broker as --token-file URL=FILE"
                        .into(),
                )
            }
            None => global.token_file = Some(PathBuf::from(entry)),
        }
    }
    Ok(())
}

/// One broker URL, or several of one database separated by commas.
pub fn parse_broker_urls(text: &str) -> Result<String, String> {
    let urls: Result<Vec<String>, String> = text.split(',').map(parse_url).collect();
    Ok(urls?.join(","))
}

pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("'{text}' is not an address like 127.0.0.1:7070"))
}

pub fn default_data_dir() -> PathBuf {
    PathBuf::from("leasehold-data")
}

/// Reads the caller's token from --token-file or LEASEHOLD_TOKEN; refuses
/// one given on the command line, where every local user can read it.
fn resolve_token(global: &mut Global) -> Result<(), String> {
    if global.token_on_command_line.is_some() {
        return Err("refusing --token VALUE: a token on the command line can be read by every local user (in /proc/PID/cmdline); put it in a file only you can read and pass --token-file FILE, or set LEASEHOLD_TOKEN".into());
    }
    global.token = match &global.token_file {
        Some(path) => Some(
            leasehold_store::private_fs::read_private_file(path)
                .map_err(|e| format!("failed to read the token: {e}"))?,
        ),
        None => std::env::var("LEASEHOLD_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()),
    };
    Ok(())
}

/// Everything this process creates (databases, keys, images, partition
/// disks) is private to its user unless it widens a mode on purpose.
#[allow(unsafe_code)]
fn make_new_files_private() {
    // SAFETY: umask only sets the process's file mode mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// A verb whose reader goes away (`leasehold leases | head -1`) ends as
/// other command-line tools do, killed by SIGPIPE without a word; Rust
/// ignores SIGPIPE, which made the closed pipe a panic with a backtrace.
/// The services keep ignoring it: a peer closing a socket must be an error
/// they handle, not their end.
#[allow(unsafe_code)]
fn end_quietly_when_stdout_closes(command: &Command) {
    if matches!(
        command,
        Command::Up(_) | Command::Broker(_) | Command::Agent(_) | Command::Images(_)
    ) {
        return;
    }
    // SAFETY: sets one signal's disposition back to the default, before any
    // other thread exists; it cannot fail for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Only `agent` lends to several brokers; every other command talks to one.
fn check_one_broker(cli: &Cli) -> Result<(), String> {
    let several = cli.global.broker_args.len() > 1
        || cli
            .global
            .broker_args
            .iter()
            .any(|(_, share)| share.is_some())
        || !cli.global.market_token_files.is_empty();
    if several && !matches!(cli.command, Command::Agent(_)) {
        return Err("only `leasehold agent` lends to several brokers (--broker URL=SHARE, --token-file URL=FILE); give this command one --broker".into());
    }
    Ok(())
}

fn main() {
    make_new_files_private();
    let mut cli = Cli::parse();
    end_quietly_when_stdout_closes(&cli.command);
    let resolved = resolve_brokers(&mut cli.global).and_then(|()| resolve_token(&mut cli.global));
    if let Err(problem) = resolved.and_then(|()| check_one_broker(&cli)) {
        eprintln!("leasehold: {problem}");
        std::process::exit(2);
    }
    if let Some(path) = &cli.global.ca_cert {
        match leasehold_api::ServerTrust::pinned_ca_file(path) {
            Ok(trust) => cli.global.server_trust = trust,
            Err(error) => {
                eprintln!("leasehold: failed to read --ca-cert: {error}");
                std::process::exit(2);
            }
        }
    }
    let log_format = match &cli.command {
        Command::Up(args) => args.operator.log_format,
        Command::Broker(args) => args.operator.log_format,
        Command::Agent(args) => args.operator.log_format,
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "leasehold", &mut std::io::stdout());
            std::process::exit(0);
        }
        _ => logging::LogFormat::Text,
    };
    logging::init(log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    let global = cli.global.clone();
    // A service's stdout carries only its ready line, so scripts (and
    // supervisors) never take a failure to start for a start.
    let error_global = match cli.command {
        Command::Up(_) | Command::Broker(_) | Command::Agent(_) => Global {
            output: OutputFormat::Text,
            ..cli.global.clone()
        },
        _ => cli.global.clone(),
    };
    let code = runtime.block_on(async move {
        let result = match cli.command {
            Command::Up(args) => serve::up(&global, args).await,
            Command::Broker(args) => serve::broker(&global, args).await,
            Command::Agent(args) => serve::agent(&global, args).await,
            Command::Images(command) => images::images(&global, command).await,
            Command::Principal(command) => verbs::principal(&global, command).await,
            Command::Whoami => verbs::whoami(&global).await,
            Command::Host(command) => verbs::host(&global, command).await,
            Command::Find(args) => verbs::find(&global, args).await,
            Command::Lease(args) => verbs::lease(&global, args).await,
            Command::Run(args) => verbs::run(&global, args).await,
            Command::Release(args) => verbs::release(&global, args).await,
            Command::Leases => verbs::leases(&global).await,
            Command::Bill => verbs::bill(&global).await,
            Command::Ledger => verbs::ledger(&global).await,
            Command::Workload(command) => reservations::workload(&global, command).await,
            Command::Pool(command) => reservations::pool(&global, command).await,
            Command::Warnings => reservations::warnings(&global).await,
            Command::Plan(command) => reservations::plan(&global, command).await,
            Command::Instance(command) => reservations::instance(&global, command).await,
            Command::Power(command) => reservations::power(&global, command).await,
            Command::Rights(command) => rights::rights(&global, command).await,
            Command::Group(command) => rights::group(&global, command).await,
            Command::Simulate(args) => simulate::simulate(&global, args),
            Command::Completions { .. } => Ok(0),
            Command::Man(args) => man::man(&global, args, <Cli as clap::CommandFactory>::command()),
        };
        match result {
            Ok(code) => code,
            Err(error) => verbs::report_error(&error_global, &error),
        }
    });
    // Do not wait for lingering background tasks (notice retries) on exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    std::process::exit(code);
}
