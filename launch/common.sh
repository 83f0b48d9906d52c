# Shared helpers for the launch scripts: errors, option values, shell quoting,
# and printing or running one command. Sourced, never executed.
#
# The calling script sets LAUNCH_NAME (used in messages) and DRY_RUN (0/1).

LAUNCH_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Prints "NAME: error: MSG" and a pointer to --help, then exits 2.
launch_die() {
  echo "${LAUNCH_NAME}: error: $*" >&2
  echo "${LAUNCH_NAME}: run with --help for usage" >&2
  exit 2
}

launch_note() {
  echo "# $*" >&2
}

# Sets LAUNCH_VALUE to the value of a `--opt=VALUE` argument; a bare `--opt`
# is an error naming it. (A global, not $(...), so that launch_die exits.)
launch_value() {
  case "$1" in
    *=*) LAUNCH_VALUE="${1#*=}" ;;
    *) launch_die "option $1 needs a value: $1=VALUE" ;;
  esac
}

# Dies unless $2 is an integer >= $3 (default 1); $1 names the option.
launch_require_int() {
  local name="$1" value="$2" min="${3:-1}"
  if [[ ! "$value" =~ ^[0-9]+$ ]] || ((10#$value < min)); then
    launch_die "$name must be an integer >= $min, got '$value'"
  fi
}

# Dies unless $2 looks like HOST:PORT; $1 names the option.
launch_require_host_port() {
  local name="$1" value="$2"
  if [[ ! "$value" =~ ^[^[:space:]:]+:[0-9]+$ && ! "$value" =~ ^\[[0-9a-fA-F:]+\]:[0-9]+$ ]]; then
    launch_die "$name must be HOST:PORT, got '$value'"
  fi
}

# Quotes one word for a POSIX shell so printed commands survive copy-paste and
# shlex.split (printf %q may emit bash-only $''): bare when safe, in double
# quotes when it has single quotes but nothing double quotes would expand
# (nor `!`, history expansion in interactive bash), else like shlex.quote.
launch_quote() {
  local s="$1"
  if [[ -z "$s" ]]; then
    printf "''"
  elif [[ "$s" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  elif [[ "$s" == *"'"* && "$s" != *[\$\`\\\"\!]* ]]; then
    # Gin string values such as --gin.MODEL_DIR='runs/x' read best this way.
    printf '"%s"' "$s"
  else
    local sq="'" esc="'\"'\"'"
    printf "'%s'" "${s//"$sq"/"$esc"}"
  fi
}

# Quotes a NAME=VALUE environment assignment (only VALUE is quoted, so the
# shell still reads it as an assignment).
launch_quote_assignment() {
  printf '%s=%s' "${1%%=*}" "$(launch_quote "${1#*=}")"
}

# Prints one command line: the first $1 words after it are NAME=VALUE
# environment assignments, the rest is the command.
launch_format() {
  local nenv="$1" i=0 word out=""
  shift
  for word in "$@"; do
    if ((i < nenv)); then
      out+="$(launch_quote_assignment "$word") "
    else
      out+="$(launch_quote "$word") "
    fi
    i=$((i + 1))
  done
  printf '%s\n' "${out% }"
}

# Prints (dry run) or runs one command; same arguments as launch_format.
launch_run() {
  if ((DRY_RUN)); then
    launch_format "$@"
    return 0
  fi
  local nenv="$1"
  shift
  if ((nenv > 0)); then
    env "$@"
  else
    "$@"
  fi
}

# The value of --gin.MODEL_DIR among the given arguments with its gin string
# quotes removed (the last one wins, as with gin); empty when absent.
launch_model_dir() {
  local arg dir="" expect=0
  for arg in "$@"; do
    if ((expect)); then
      dir="$arg"
      expect=0
      continue
    fi
    case "$arg" in
      --gin.MODEL_DIR=*) dir="${arg#--gin.MODEL_DIR=}" ;;
      --gin.MODEL_DIR) expect=1 ;;
    esac
  done
  if [[ "$dir" =~ ^\'(.*)\'$ || "$dir" =~ ^\"(.*)\"$ ]]; then
    dir="${BASH_REMATCH[1]}"
  fi
  printf '%s' "$dir"
}
