//! The `mpcs` command line: parses arguments, calls the library, maps errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use mpcs::cache::{Cache, CACHE_ENV};
use mpcs::commands::{self, GraphFormat, RunArgs};
use mpcs::error::{exit, Error};
use mpcs::exec::devices::DeviceSpec;
use mpcs::exec::progress::{Console, Reporter, Silent};
use mpcs::remote::{Mode, RemoteSpec, REMOTE_ENV};

// mimalloc: ~10% faster CPU training than glibc's malloc (benches/train_step.rs, notes/speed.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "mpcs",
    version,
    args_override_self = true,
    about = "Reproduce and extend MPCS (WACV 2023) as a cached experiment DAG",
    long_about = "mpcs runs experiments declared as TOML DAGs (download → stain-normalise → patchify → split → \
                  pretrain → fine-tune → evaluate → table), caching every node's output by content so that only \
                  what changed reruns.\n\nStart with:  mpcs run experiments/quickstart.toml\nThen look:    mpcs graph experiments/quickstart.toml"
)]
struct Cli {
    /// Cache directory (default: ./cache)
    #[arg(long, global = true, env = CACHE_ENV, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// More log output (-v, -vv)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// Where the remote cache is and what a command may do with it.
#[derive(clap::Args, Clone)]
struct RemoteArgs {
    /// Remote cache to pull missing entries from and push new ones to: s3://bucket/prefix (credentials and
    /// endpoint from the AWS environment variables or ~/.aws). Default: the experiment's [cache] remote
    #[arg(long, env = REMOTE_ENV, value_name = "S3_URL")]
    remote: Option<String>,
    /// read: pull only; write: push only; read-write: both
    #[arg(long, value_enum, env = "MPCS_REMOTE_MODE", default_value = "read-write")]
    remote_mode: Mode,
    /// When the remote is down or refuses the credentials, warn and work locally instead of failing
    #[arg(long, env = "MPCS_REMOTE_FALLBACK")]
    remote_fallback: bool,
}

impl RemoteArgs {
    /// The remote asked for; an empty URL stands for the experiment's `[cache] remote`.
    fn spec(&self) -> RemoteSpec {
        RemoteSpec {
            url: self.remote.clone().unwrap_or_default(),
            mode: self.remote_mode,
            fallback: self.remote_fallback,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run an experiment: execute every node whose inputs or parameters changed, reuse the rest.
    Run {
        /// The experiment file (TOML)
        experiment: PathBuf,
        /// Override a value of the file: --set stage.finetune.lr=0.01 (a command's: stage.NAME.params.KEY=V; repeatable)
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        sets: Vec<String>,
        /// Nodes to run at once (default: number of CPU cores)
        #[arg(short, long)]
        jobs: Option<usize>,
        /// GPUs to hand out: auto (CUDA_VISIBLE_DEVICES or nvidia-smi), cpu, or a list like 0,1 / cuda:0,cuda:1
        #[arg(long, default_value = "auto")]
        devices: DeviceSpec,
        /// Keep running independent branches after a node fails
        #[arg(short, long)]
        keep_going: bool,
        /// Show what would run (and on which device class) without running anything
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Print a JSON summary as the last line of stdout
        #[arg(long)]
        json: bool,
        /// Plain log lines instead of live progress bars
        #[arg(long)]
        plain: bool,
        /// No progress output at all
        #[arg(short, long)]
        quiet: bool,
        /// Where nodes run: local (threads here) or slurm (one sbatch job per node; see --profile). Default: the
        /// experiment's [executor] kind, else local
        #[arg(long, value_enum, env = "MPCS_EXECUTOR")]
        executor: Option<ExecutorKind>,
        /// A profile file with a [slurm] table (partition, account, qos, time, mem, cpus, sbatch_args, mpcs,
        /// per-stage overrides), kept per cluster
        #[arg(long, value_name = "FILE", env = "MPCS_PROFILE")]
        profile: Option<PathBuf>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Upload an experiment's entries that the remote cache lacks (blobs first, then each record).
    Push {
        experiment: PathBuf,
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        sets: Vec<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Download an experiment's entries from the remote cache (verified file by file) without running anything.
    Pull {
        experiment: PathBuf,
        /// Only the nodes of these stages (e.g. --only table,evaluate)
        #[arg(long, value_delimiter = ',', value_name = "STAGES")]
        only: Vec<String>,
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        sets: Vec<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Run one node of a submitted job (what an `--executor slurm` job runs on its compute node).
    #[command(hide = true)]
    Worker {
        /// The job file the submitting `mpcs run` wrote
        #[arg(required_unless_present = "array")]
        job: Option<PathBuf>,
        /// A list of job files, one per line: run the one at line $SLURM_ARRAY_TASK_ID (from 0)
        #[arg(long, value_name = "LIST")]
        array: Option<PathBuf>,
    },
    /// Show the DAG with each node's state (cached, will-run, blocked, failed), or why one node would rerun.
    Graph {
        experiment: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        format: GraphFormat,
        /// Explain exactly what differs from the node's last recorded run
        #[arg(long, value_name = "NODE")]
        why: Option<String>,
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        sets: Vec<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Print a cache entry's manifest and where its files and log are (by node id or key prefix).
    Show {
        /// A node id (e.g. 'finetune[fold=0,lr=0.1]') or a key prefix (at least 4 hex digits)
        target: String,
        /// Resolve the node in this experiment (default: the newest record in any experiment)
        #[arg(long = "exp", value_name = "EXPERIMENT")]
        experiment: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        sets: Vec<String>,
        /// Print the raw manifest as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Remove cache entries that none of the given experiments reaches.
    Gc {
        #[arg(required = true)]
        experiments: Vec<PathBuf>,
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        sets: Vec<String>,
        /// Only say what would be removed
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Collect the remote cache instead of the local one (URL: as for run, default $MPCS_REMOTE, else the
        /// first experiment's [cache] remote). Refuses while another process pushes to it
        #[arg(long, value_name = "S3_URL", num_args = 0..=1, default_missing_value = "")]
        remote: Option<String>,
    },
    /// Generate a synthetic dataset in a real layout (H&E-like images, nested magnifications).
    Synth {
        /// breakhis, bach or breast-cell
        dataset: String,
        /// Output folder (must not exist or be empty)
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// BreakHis: patients (default 16); BACH / breast cell: images per class
        #[arg(long)]
        patients: Option<usize>,
        /// Image size WIDTHxHEIGHT (default: the real size, e.g. 700x460 for BreakHis)
        #[arg(long)]
        size: Option<String>,
    },
    /// Write seeded encoder weights in torchvision's layout, with ImageNet's 1000-class head by default: a stand-in
    /// for downloaded ImageNet weights where there is no network (a GPU machine, a test), e.g.
    /// `--set stage.imagenet.url=file:///tmp/rn50.safetensors` in a paper experiment. Not pretrained: random.
    InitWeights {
        /// resnet18, resnet34, resnet50, resnet101, resnet152 or efficientnet_b2
        #[arg(long)]
        arch: String,
        /// Output file (.safetensors)
        #[arg(long)]
        out: PathBuf,
        /// Classes of the head
        #[arg(long, default_value_t = 1000)]
        classes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Stain-normalise single images to a target (outputs keep their input's name, as PNG).
    Stain {
        /// macenko, reinhard (HistomicsTK lαβ), reinhard-lab (CIE LAB) or vahadane
        #[arg(long)]
        method: String,
        /// Target image (default: reinhard → the paper's BACH statistics; macenko → torchstain's reference)
        #[arg(long)]
        target: Option<PathBuf>,
        /// Output folder
        #[arg(long)]
        out: PathBuf,
        /// Images to normalise
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// One self-contained HTML page with an experiment's results: tables beside the paper's, loss curves,
    /// confusion matrices, Grad-CAM overlays and a t-SNE map (written with its PNGs to results/<experiment>/).
    Report {
        experiment: PathBuf,
        /// Output folder (default: results/<experiment name>)
        #[arg(long)]
        out: Option<PathBuf>,
        /// Grad-CAM overlays to draw
        #[arg(long, default_value_t = 4)]
        cams: usize,
        /// Most test images in the t-SNE map
        #[arg(long, default_value_t = 400)]
        tsne_points: usize,
        /// Override a value of the experiment file, as for `run`
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Re-hash every cache entry and report any whose files no longer match their manifest.
    Verify {
        /// Delete corrupt entries so the next run recomputes them
        #[arg(long)]
        remove: bool,
    },
    /// Raw model outputs (logits) for every image of a folder (recursively), as CSV: file,out_0,out_1,...
    Predict {
        #[command(flatten)]
        model: commands::InferArgs,
        /// Folder of images (.png .jpg .tif), searched recursively
        #[arg(long)]
        images: PathBuf,
        /// Output CSV
        #[arg(long)]
        out: PathBuf,
        /// Fail unless the model has this many outputs
        #[arg(long)]
        classes: Option<usize>,
        #[arg(long, default_value_t = 16)]
        batch: usize,
    },
    /// Pooled encoder features for every image of a folder, as safetensors (features [n, d], files in metadata).
    Embed {
        #[command(flatten)]
        model: commands::InferArgs,
        #[arg(long)]
        images: PathBuf,
        /// Output .safetensors
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 16)]
        batch: usize,
    },
    /// Grad-CAM heat maps over images (one <name>.cam.png per image in --out).
    Cam {
        #[command(flatten)]
        model: commands::InferArgs,
        /// Output folder
        #[arg(long)]
        out: PathBuf,
        /// Class to explain (default: each image's top class)
        #[arg(long)]
        class: Option<usize>,
        /// Layer whose map is explained: layer1..layer4 (ResNet), head (EfficientNet). Default: the deepest
        /// with at least 4×4 cells at this input size (layer4 from about 100 px up)
        #[arg(long)]
        layer: Option<String>,
        /// Opacity of the heat map
        #[arg(long, default_value_t = 0.4)]
        alpha: f32,
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Measure training throughput on synthetic input: `mpcs bench train --arch resnet18 --size 64`.
    /// The last output line is `images_per_s=<number>`.
    Bench {
        /// `train`: forward, backward and Adam step per batch; `loader`: images/s the training loader
        /// delivers with the MPCS augmentation (uses --size, --batch, --threads, --steps as batches)
        #[arg(value_parser = ["train", "loader"])]
        what: String,
        /// resnet18, resnet34, resnet50, resnet101, resnet152 or efficientnet_b2
        #[arg(long, default_value = "resnet18")]
        arch: String,
        /// Square input size in pixels
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Timed steps (after one warm-up step)
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// CPU threads (default: RAYON_NUM_THREADS, else all cores)
        #[arg(long)]
        threads: Option<usize>,
        /// `cpu` or `cuda:N` (a build with the `cuda` feature)
        #[arg(long, default_value = "cpu")]
        device: String,
        /// `f32`, or `bf16`: convolutions and linear layers in bfloat16 (a training stage's `precision`)
        #[arg(long, default_value = "f32")]
        precision: String,
    },
    /// Check the training path of this machine: list its GPUs and compare one encoder training step (loss,
    /// gradients, BatchNorm statistics, updated weights) on `--device` against the CPU's fused kernels.
    /// Exit 0 when every check passes, 1 on a mismatch.
    Doctor {
        /// `cuda:N`, or `cpu`: candle's own ops on the CPU, the code a GPU runs
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Comma-separated architectures
        #[arg(long, default_value = "resnet18,resnet50", value_delimiter = ',')]
        arch: Vec<String>,
        /// Square input size in pixels
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Seed of the initial weights and the batch
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// `mpcs show … | head -1`: when the reader of stdout goes away, exit quietly (as ripgrep and GNU tools do)
/// instead of std's panic ("failed printing to stdout: Broken pipe") with exit 101. std offers no other hook
/// for `println!`; every other panic goes to the default hook as before.
fn exit_quietly_on_broken_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    exit_quietly_on_broken_stdout();
    mpcs::runtime::configure();
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MPCS_LOG")
        // The S3 client's own retry notices would interleave with progress; its failures reach the user as errors.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},object_store=warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();

    let code = match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "{}",
                e.message
                    .strip_prefix("error: ")
                    .map(|m| format!("error: {m}"))
                    .unwrap_or_else(|| format!("error: {}", e.message))
            );
            e.exit_code()
        }
    };
    ExitCode::from(code as u8)
}

/// The flag the first Ctrl-C (or SIGTERM, as from `scancel`) raises to stop cleanly; a second exits at once
/// (nothing half-done is visible either way).
fn cancel_on_signals() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, exit::INTERRUPTED, Arc::clone(&cancel));
        let _ = signal_hook::flag::register(sig, Arc::clone(&cancel));
    }
    cancel
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExecutorKind {
    Local,
    Slurm,
}

fn real_main(cli: Cli) -> Result<i32, Error> {
    let cache_dir = cli.cache.unwrap_or_else(|| PathBuf::from("cache"));
    let cache = || Cache::open(&cache_dir);
    match cli.command {
        Command::Worker { job, array } => {
            let cancel = cancel_on_signals();
            // Slurm's warning ahead of the time limit (`--signal=B:USR1@N`).
            let time_up = Arc::new(AtomicBool::new(false));
            let _ = signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&time_up));
            let job = match (job, array) {
                (Some(job), _) => job,
                (None, Some(list)) => commands::array_element(&list)?,
                (None, None) => return Err(Error::user("give a job file or --array LIST")),
            };
            commands::worker(&job, &cancel, &time_up)
        }
        Command::Run {
            experiment,
            sets,
            jobs,
            devices,
            keep_going,
            dry_run,
            json,
            plain,
            quiet,
            executor,
            profile,
            remote,
        } => {
            let cancel = cancel_on_signals();
            let executor = executor.map(|e| match e {
                ExecutorKind::Local => "local",
                ExecutorKind::Slurm => "slurm",
            });
            let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
            let console;
            let reporter: &dyn Reporter = if quiet {
                &Silent
            } else {
                console = Console::new(plain);
                &console
            };
            let profile = profile.as_deref();
            let remote = remote.spec();
            let args = RunArgs {
                remote: Some(&remote),
                experiment: &experiment,
                sets: &sets,
                jobs,
                devices,
                keep_going,
                dry_run,
                json,
                executor,
                profile,
            };
            commands::run(&args, &cache_dir, reporter, &cancel)
        }
        Command::Graph { experiment, format, why, sets, remote } => {
            commands::graph(&experiment, &sets, format, why.as_deref(), &cache_dir, Some(&remote.spec()))
        }
        Command::Push { experiment, sets, remote } => commands::push(&experiment, &sets, &remote.spec(), &cache()?),
        Command::Pull { experiment, only, sets, remote } => {
            commands::pull(&experiment, &sets, &only, &remote.spec(), &cache()?)
        }
        Command::Show { target, experiment, sets, json, remote } => {
            commands::show(&target, experiment.as_deref(), &sets, json, &cache()?, Some(&remote.spec()))
        }
        Command::Gc { experiments, sets, dry_run, remote: None } => {
            commands::gc(&experiments, &sets, dry_run, &cache()?)
        }
        Command::Gc { experiments, sets, dry_run, remote: Some(url) } => {
            let url = if url.is_empty() { std::env::var(REMOTE_ENV).unwrap_or_default() } else { url };
            let spec = RemoteSpec { url, mode: Mode::ReadWrite, fallback: false };
            commands::gc_remote(&experiments, &sets, dry_run, &spec, &cache()?)
        }
        // Checking a cache that does not exist must not create one.
        Command::Verify { .. } if !cache_dir.exists() => {
            println!("no cache at {}: nothing to verify", cache_dir.display());
            Ok(mpcs::error::exit::OK)
        }
        Command::Verify { remove } => commands::verify(remove, &cache()?),
        Command::Report { experiment, out, cams, tsne_points, sets } => {
            commands::report(&experiment, &sets, out, cams, tsne_points, &cache()?)
        }
        Command::InitWeights { arch, out, classes, seed } => commands::init_weights(&arch, &out, classes, seed),
        Command::Stain { method, target, out, inputs } => commands::stain(&method, target.as_deref(), &inputs, &out),
        Command::Synth { dataset, out, seed, patients, size } => {
            commands::synth(&dataset, &out, seed, patients, size.as_deref())
        }
        Command::Predict { model, images, out, classes, batch } => {
            commands::predict(&model, &images, &out, classes, batch)
        }
        Command::Embed { model, images, out, batch } => commands::embed(&model, &images, &out, batch),
        Command::Cam { model, out, class, layer, alpha, images } => {
            commands::cam(&model, &images, &out, class, layer, alpha)
        }
        Command::Bench { what, arch, size, batch, steps, threads, device, precision } => {
            if what == "loader" {
                commands::bench_loader(size, batch, steps, threads)
            } else {
                commands::bench(&arch, size, batch, steps, threads, &device, &precision)
            }
        }
        Command::Doctor { device, arch, size, batch, seed } => commands::doctor(device, &arch, size, batch, seed),
    }
}
